"""Connector tests: shapes vs num_tokens, parameter counts by formula, TinyLLaVA key names, gradients, values."""
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from connectors import CONNECTORS, build_connector, pixel_shuffle  # noqa: E402

DV, D, B = 12, 16, 2  # tiny vision width, LLM width, batch
TINY = dict(num_queries=5, num_layers=2, resampler_heads=2, resampler_dim_head=4,
            qformer_hidden=8, qformer_heads=2, qformer_layers=3, qformer_ffn=20, qformer_cross_freq=2)
DV2 = 10  # DINOv2 width for the mof_mlp cases that use one


def mlp_params(din, d, k):  # Linear(din, D) + (k-1) Linear(D, D), all with bias
    return din * d + d + (k - 1) * (d * d + d)


def resampler_params(dv, d, q, layers, heads, dh):
    inner = heads * dh
    attn = 2 * 2 * d + d * inner + d * 2 * inner + inner * d  # norm_media, norm_latents, to_q, to_kv, to_out
    ff = 2 * d + d * 4 * d + 4 * d * d  # LayerNorm + two bias-free linears
    return q * d + dv * d + d + layers * (attn + ff) + 2 * d  # latents, linear, blocks, final norm


def qformer_params(dv, d, q, h, layers, ffn, freq):
    self_attn = 4 * (h * h + h) + 2 * h  # q, k, v, out + post-LN
    cross = (h * h + h) + 2 * (dv * h + h) + (h * h + h) + 2 * h  # q, k/v from Dv, out + post-LN
    ffn_block = h * ffn + ffn + ffn * h + h + 2 * h
    n_cross = sum(1 for i in range(layers) if i % freq == 0)
    return q * h + layers * (self_attn + ffn_block) + n_cross * cross + h * d + d  # input LN is non-affine


# name, build kwargs, input (tensor or pair), n_in, expected tokens, expected parameter count
CASES = {
    "identity": ("identity", dict(), (B, 9, D), 9, 9, 0),
    "linear": ("linear", dict(), (B, 9, DV), 9, 9, DV * D + D),
    "mlp1x_gelu": ("mlp1x_gelu", dict(), (B, 9, DV), 9, 9, mlp_params(DV, D, 1)),
    "mlp2x_gelu": ("mlp2x_gelu", dict(), (B, 9, DV), 9, 9, DV * D + D + D * D + D),
    "mlp3x_gelu": ("mlp3x_gelu", dict(), (B, 9, DV), 9, 9, mlp_params(DV, D, 3)),
    "mof_mlp": ("mof_mlp", dict(), ((B, 7, DV), (B, 7, DV)), (7, 7), 14, 2 * mlp_params(DV, D, 2)),
    "mof_mlp_dv2": ("mof_mlp", dict(vision_dim2=DV2), ((B, 7, DV), (B, 7, DV2)), (7, 7), 14,
                    mlp_params(DV, D, 2) + mlp_params(DV2, D, 2)),
    "resampler": ("resampler", TINY, (B, 9, DV), 9, 5, resampler_params(DV, D, 5, 2, 2, 4)),
    "qformer": ("qformer", TINY, (B, 9, DV), 9, 5, qformer_params(DV, D, 5, 8, 3, 20, 2)),
    "ps2_16": ("pixel_shuffle2_mlp2x_gelu", dict(), (B, 16, DV), 16, 4, mlp_params(4 * DV, D, 2)),
    "ps2_25": ("pixel_shuffle2_mlp2x_gelu", dict(), (B, 25, DV), 25, 9, mlp_params(4 * DV, D, 2)),
    "ps3_36": ("pixel_shuffle3_mlp1x_gelu", dict(), (B, 36, DV), 36, 4, mlp_params(9 * DV, D, 1)),
}


def make(case):
    name, kw, shape, n_in, _, _ = CASES[case]
    conn = build_connector(name, D if name == "identity" else DV, D, **kw)
    x = tuple(torch.randn(s) for s in shape) if isinstance(shape[0], tuple) else torch.randn(shape)
    return conn, x


@pytest.mark.parametrize("case", CASES)
def test_shape_num_tokens_and_param_count(case):
    conn, x = make(case)
    _, _, _, n_in, n_out, n_params = CASES[case]
    out = conn(x)
    assert out.shape == (B, n_out, D)
    assert conn.num_tokens(n_in) == n_out
    assert sum(p.numel() for p in conn.parameters()) == n_params


@pytest.mark.parametrize("case", [c for c in CASES if c != "identity"])
def test_gradients_reach_every_parameter(case):
    torch.manual_seed(0)
    conn, x = make(case)
    out = conn(x)
    # a random weighting, not a plain sum: sum(LayerNorm(x)) does not depend on x, which would zero the resampler's grads
    (out * torch.randn_like(out)).sum().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_keys_match_tinyllava():
    keys = lambda name, **kw: set(build_connector(name, DV, D, **kw).state_dict())
    lin = lambda prefix: {f"{prefix}.weight", f"{prefix}.bias"}
    assert keys("linear") == lin("_connector")
    assert keys("mlp2x_gelu") == lin("_connector.0") | lin("_connector.2")
    assert keys("mlp3x_gelu") == lin("_connector.0") | lin("_connector.2") | lin("_connector.4")
    assert keys("mof_mlp") == {k for t in ("clip", "dinov2") for i in (0, 2) for k in lin(f"_connector.{t}.{i}")}
    expected = {"_connector.latents", "_connector.norm.weight", "_connector.norm.bias"} | lin("_connector.linear")
    for i in range(3):
        a, f = f"_connector.layers.{i}.0", f"_connector.layers.{i}.1"
        expected |= lin(f"{a}.norm_media") | lin(f"{a}.norm_latents") | lin(f"{f}.0")
        expected |= {f"{a}.to_q.weight", f"{a}.to_kv.weight", f"{a}.to_out.weight", f"{f}.1.weight", f"{f}.3.weight"}
    sd = build_connector("resampler", DV, D).state_dict()
    assert set(sd) == expected
    assert sd["_connector.latents"].shape == (128, D)
    assert sd["_connector.layers.0.0.to_q.weight"].shape == (512, D)
    assert sd["_connector.layers.0.0.to_kv.weight"].shape == (1024, D)
    assert sd["_connector.layers.0.1.1.weight"].shape == (4 * D, D)
    # the pixel-shuffle MLP keeps the mlp layout
    assert keys("pixel_shuffle2_mlp2x_gelu") == lin("_connector.0") | lin("_connector.2")


def test_unknown_names_raise_and_list_the_valid_ones():
    for bad in ["mlp", "mlp2x_relu", "xmlp2x_gelu", "mlp2x_gelu_mof", "mof", "mof_mlp2", "Linear", "pixel_shuffle2"]:
        with pytest.raises(ValueError) as err:
            build_connector(bad, DV, D)
        for pattern in CONNECTORS:
            assert pattern in str(err.value)
    with pytest.raises(ValueError, match="depth"):
        build_connector("mlp0x_gelu", DV, D)
    with pytest.raises(ValueError, match="init"):
        build_connector("linear", DV, D, init="xavier")
    with pytest.raises(TypeError):
        build_connector("linear", DV, D, num_querys=3)  # a typo in an option is not silently ignored


def test_each_name_matches_exactly_one_pattern():
    names = ["identity", "linear", "mlp2x_gelu", "mlp12x_gelu", "mof_mlp", "resampler", "qformer",
             "pixel_shuffle2_mlp2x_gelu", "pixel_shuffle4_mlp1x_gelu"]
    for name in names:
        assert sum(bool(re.fullmatch(p, name)) for p in CONNECTORS) == 1, name


def test_identity_needs_equal_widths():
    with pytest.raises(ValueError, match="vision_dim == llm_dim"):
        build_connector("identity", DV, D)


def test_mof_mlp_interleaves_by_value():
    conn = build_connector("mof_mlp", DV, D, vision_dim2=DV2)
    clip, dino = torch.randn(B, 6, DV), torch.randn(B, 6, DV2)
    out = conn((clip, dino))
    torch.testing.assert_close(out[:, 0::2], conn._connector.clip(clip))
    torch.testing.assert_close(out[:, 1::2], conn._connector.dinov2(dino))
    with pytest.raises(ValueError, match="interleaves"):
        conn((clip, dino[:, :5]))
    with pytest.raises(TypeError):
        conn.num_tokens(6)


# the exact GELU, 0.5 x (1 + erf(x / sqrt 2)), in float64, on inputs where the tanh approximation is up to 4e-4 off
GRID = torch.linspace(-5, 5, 101, dtype=torch.float64)


def erf_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


GELUS = {"mlp1x_gelu": 0, "mlp2x_gelu": 1, "mlp3x_gelu": 2, "mof_mlp": 2, "mof_mlp_dv2": 2, "resampler": 2,
         "qformer": 3, "ps2_16": 1, "ps2_25": 1, "ps3_36": 0, "identity": 0, "linear": 0}   # per case, as built


@pytest.mark.parametrize("case", CASES)
def test_every_gelu_is_the_exact_erf_one(case):
    """LLaVA's mlp connectors, Flamingo's resampler and BLIP-2's BERT FFN all use the exact GELU (nn.GELU(),
    BERT's "gelu"), which the released weights were trained with: each activation by value, and none missing."""
    conn, _ = make(case)
    gelus = [m for m in conn.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == GELUS[case]
    for m in gelus:
        torch.testing.assert_close(m(GRID.float()), erf_gelu(GRID).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,tokens,depth", [("mlp2x_gelu", 1, 2), ("mlp3x_gelu", 1, 3), ("mof_mlp", 1, 2),
                                               ("pixel_shuffle2_mlp2x_gelu", 4, 2)])
def test_mlp_connectors_apply_the_exact_gelu_by_value(name, tokens, depth):
    """Through the whole connector (so an activation swapped inside a forward counts too): the first Linear writes
    GRID into the pre-activations of one token, every later Linear passes its input on unchanged, so the output is
    the exact GELU applied depth - 1 times. The tanh approximation differs by > 1e-4: the check can tell them apart."""
    exact, n = GRID, len(GRID)
    for _ in range(depth - 1):
        exact = erf_gelu(exact)
    tanh = F.gelu(GRID, approximate="tanh")
    assert (erf_gelu(GRID) - tanh).abs().max() > 1e-4
    conn = build_connector(name, 1, n)
    mlps = [conn._connector.clip, conn._connector.dinov2] if name == "mof_mlp" else [conn._connector]
    with torch.no_grad():
        for mlp in mlps:
            first, *rest = [m for m in mlp if isinstance(m, nn.Linear)]
            assert len(rest) == depth - 1
            first.weight.zero_()[:, 0] = GRID.float()
            first.bias.zero_()
            for lin in rest:
                lin.weight.copy_(torch.eye(n))
                lin.bias.zero_()
    ones = torch.ones(1, tokens, 1)
    out = conn((ones, ones) if name == "mof_mlp" else ones)
    assert out.shape == (1, len(mlps), n)
    for row in out[0]:
        torch.testing.assert_close(row, exact.float(), rtol=0, atol=1e-6)


def loop_pixel_shuffle(x, s):
    """Reference: pad the grid with zeros, then for each output cell concatenate its block row by row."""
    b, n, c = x.shape
    side = math.isqrt(n)
    padded = -(-side // s) * s
    grid = torch.zeros(b, padded, padded, c)
    grid[:, :side, :side] = x.view(b, side, side, c)
    tokens = []
    for i in range(padded // s):
        for j in range(padded // s):
            tokens.append(torch.cat([grid[:, i * s + dy, j * s + dx] for dy in range(s) for dx in range(s)], dim=-1))
    return torch.stack(tokens, dim=1)


def test_pixel_shuffle_by_value():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid, token value = its index
    assert pixel_shuffle(x, 2)[0, :, :].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    for n, s in [(16, 2), (25, 2), (36, 3), (49, 3)]:
        x = torch.randn(B, n, 3)
        torch.testing.assert_close(pixel_shuffle(x, s), loop_pixel_shuffle(x, s))
    conn = build_connector("pixel_shuffle2_mlp2x_gelu", DV, D)
    x = torch.randn(B, 25, DV)
    torch.testing.assert_close(conn(x), conn._connector[2](F.gelu(conn._connector[0](loop_pixel_shuffle(x, 2)))))


def test_pixel_shuffle_siglip_27x27():
    dv = 4
    x = torch.randn(B, 729, dv)
    shuffled = pixel_shuffle(x, 2)
    assert shuffled.shape == (B, 196, 4 * dv)
    # undo the shuffle onto the padded 28x28 grid: the real patches are back in place, row/column 27 are zeros
    grid = shuffled.view(B, 14, 14, 2, 2, dv).permute(0, 1, 3, 2, 4, 5).reshape(B, 28, 28, dv)
    torch.testing.assert_close(grid[:, :27, :27], x.view(B, 27, 27, dv))
    assert (grid[:, 27] == 0).all() and (grid[:, :, 27] == 0).all()
    conn = build_connector("pixel_shuffle2_mlp2x_gelu", dv, D)
    assert conn(x).shape == (B, 196, D) and conn.num_tokens(729) == 196
    assert build_connector("pixel_shuffle2_mlp2x_gelu", 1024, D).num_tokens(576) == 144  # CLIP-L/336
    with pytest.raises(ValueError, match="square"):
        conn(x[:, 1:])  # TinyLLaVA's 728-token SigLIP output
    with pytest.raises(ValueError, match="square"):
        conn.num_tokens(728)


def reference_resampler(r, x, heads, dim_head):
    """Flamingo's Perceiver Resampler written with einsum, reading the weights of our module `r`."""
    ln = lambda t, norm: F.layer_norm(t, (t.shape[-1],), norm.weight, norm.bias, norm.eps)
    x = x @ r.linear.weight.T + r.linear.bias
    latents = r.latents.unsqueeze(0).repeat(x.shape[0], 1, 1)
    for attn, ff in r.layers:
        xm, lat = ln(x, attn.norm_media), ln(latents, attn.norm_latents)
        q = lat @ attn.to_q.weight.T
        k, v = (torch.cat([xm, lat], dim=1) @ attn.to_kv.weight.T).chunk(2, dim=-1)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, dim_head) for t in (q, k, v))  # b n h d
        sim = torch.einsum("bihd,bjhd->bhij", q * dim_head ** -0.5, k)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        out = torch.einsum("bhij,bjhd->bihd", sim.softmax(dim=-1), v).reshape(q.shape[0], q.shape[1], -1)
        latents = out @ attn.to_out.weight.T + latents
        h = ln(latents, ff[0]) @ ff[1].weight.T
        latents = F.gelu(h) @ ff[3].weight.T + latents
    return ln(latents, r.norm)


def test_resampler_matches_einsum_reference():
    torch.manual_seed(0)
    conn = build_connector("resampler", DV, D, num_queries=6, num_layers=2, resampler_heads=2, resampler_dim_head=8)
    with torch.no_grad():  # non-trivial LayerNorm affines so the check covers them too
        for name, p in conn.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for _, ff in conn._connector.layers:   # FFN pre-activations of a few units (at init: ~0.1, where any GELU
            ff[1].weight.mul_(30)               # approximation agrees with the exact one to 1e-6)
            ff[3].weight.mul_(10)
    x = torch.randn(B, 11, DV)
    torch.testing.assert_close(conn(x), reference_resampler(conn._connector, x, 2, 8), rtol=1e-5, atol=1e-5)


def test_qformer_uses_the_image_and_dropout_only_in_training():
    conn = build_connector("qformer", DV, D, **TINY).eval()
    x = torch.randn(B, 9, DV)
    assert torch.equal(conn(x), conn(x))
    assert not torch.allclose(conn(x), conn(torch.randn(B, 9, DV)))
    assert not torch.allclose(conn.train()(x), conn(x))  # dropout 0.1 is on in training
    layers = conn._connector.layers
    assert [layer.cross_attn is not None for layer in layers] == [True, False, True]


def test_qformer_defaults_are_blip2_bert_base():
    with torch.device("meta"):  # no memory, no init cost
        conn = build_connector("qformer", 1152, 2560)
    assert len(conn._connector.layers) == 12 and conn.num_tokens(729) == 128
    assert sum(layer.cross_attn is not None for layer in conn._connector.layers) == 6
    n = sum(p.numel() for p in conn.parameters())
    assert n == qformer_params(1152, 2560, 128, 768, 12, 3072, 2)


def test_init():
    torch.manual_seed(0)
    w = build_connector("mlp2x_gelu", 512, 1024)._connector  # init="tinyllava" by default
    for lin in (w[0], w[2]):
        assert abs(lin.weight.std().item() - 0.02) < 0.001 and abs(lin.weight.mean().item()) < 0.001
        assert (lin.bias == 0).all()
    torch_lin = build_connector("linear", 512, 1024, init="torch")._connector
    assert abs(torch_lin.weight.std().item() - 1 / math.sqrt(3 * 512)) < 0.001  # Kaiming-uniform, bound 1/sqrt(fan_in)
    assert (torch_lin.bias != 0).any()
    r = build_connector("resampler", 64, 256)._connector
    assert abs(r.latents.std().item() - 1.0) < 0.05  # latents keep randn
    assert abs(r.layers[0][0].to_kv.weight.std().item() - 0.02) < 0.002
    assert (r.norm.weight == 1).all() and (r.norm.bias == 0).all()
    qf = build_connector("qformer", DV, D, **TINY)._connector
    assert abs(qf.query_tokens.std().item() - 0.02) < 0.01

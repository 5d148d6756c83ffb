"""Connectors: map vision-tower features (B, N, Dv) to LLM-width tokens (B, M, D).

    from connectors import build_connector
    conn = build_connector("mlp2x_gelu", vision_dim=1152, llm_dim=2560)   # init="tinyllava" | "torch"
    tokens = conn(feats)          # (B, 729, 1152) -> (B, 729, 2560)
    conn.num_tokens(729)          # 729, how many image tokens to reserve in the prompt

| name                          | tokens out for N in                   | from                                        |
|-------------------------------|---------------------------------------|---------------------------------------------|
| identity                      | N  (needs Dv == D)                    | TinyLLaVA                                   |
| linear                        | N                                     | TinyLLaVA                                   |
| mlp{K}x_gelu  (K >= 1)        | N                                     | LLaVA-1.5; mlp2x_gelu = every released model |
| mof_mlp                       | N1 + N2, clip/dino interleaved        | TinyLLaVA (Interleaved-MoF, Tong et al. 2024) |
| resampler                     | num_queries (128)                     | TinyLLaVA (Flamingo Perceiver Resampler)    |
| qformer                       | num_queries (128)                     | TinyLLaVA (BLIP-2); our own compact version |
| pixel_shuffle{S}_mlp{K}x_gelu | ceil(sqrt(N) / S)**2  (729 -> 196, S=2) | nanoVLM / Idefics3; not in TinyLLaVA        |

Every connector is a `Connector` whose only child is `_connector`, so its state-dict keys are `_connector.*`
(`connector._connector.*` in the full model), the same names TinyLLaVA Factory uses for linear, mlp, mof_mlp and
resampler: released checkpoints load unchanged. The Q-Former's names are ours (the original vendored LAVIS's BERT,
and no Q-Former checkpoint was released). pixel_shuffle's MLP keeps the mlp layout (`_connector.0.*`, `.2.*`, ...).
Names are full-matched against the regex keys of CONNECTORS; there is no substring matching.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

INIT_STD = 0.02  # TinyLLaVA's _init_weights uses the LLM's initializer_range: 0.02 for every LLM it supports


class Connector(nn.Module):
    """The wrapper model.py sees: forward and num_tokens; its single child `_connector` fixes the key prefix.
    With tiling (model.ModelArgs.max_tiles) it also holds `image_newline`, the learned embedding that ends each row of
    an image's views (key `connector.image_newline`; absent without tiling, so the keys stay the original's)."""

    def __init__(self, name: str, connector: nn.Module, llm_dim: int = 0, newline: bool = False):
        super().__init__()
        self.name = name
        self._connector = connector
        if newline:
            self.image_newline = nn.Parameter(torch.randn(llm_dim) * INIT_STD)

    def forward(self, x, grids=None):
        """Tower features (views, N, Dv) -> (views, M, D); with `grids` (tiling: one (rows, cols) per image, its
        views consecutive in x) the tokens of all images as one (sum of image_tokens, D) tensor (tile_tokens)."""
        y = self._connector(x)
        return y if grids is None else tile_tokens(y, grids, self.image_newline)

    def num_tokens(self, n_in):
        """Output tokens per view for n_in input tokens (a pair (n_clip, n_dino) for mof_mlp)."""
        count = getattr(self._connector, "num_tokens", None)  # token-preserving connectors define none
        return count(n_in) if count is not None else n_in


def views_of(grid) -> int:
    """Views of a tiled image on a (rows, cols) grid: the global view, plus the tiles unless the grid is 1x1."""
    rows, cols = grid
    return 1 if rows * cols == 1 else 1 + rows * cols


def image_tokens(per_view: int, grid=None) -> int:
    """Tokens of one image: per_view without tiling (grid None) and for a 1x1 grid (the global view alone, as
    untiled); else each row of views (the global view, then each row of tiles) followed by one newline:
    per_view * (1 + rows * cols) + 1 + rows."""
    if grid is None or grid[0] * grid[1] == 1:
        return per_view
    return per_view * views_of(grid) + 1 + grid[0]


def most_image_tokens(per_view: int, max_tiles: int) -> int:
    """The tokens of an image on the grid of at most max_tiles tiles that takes the most."""
    return max(image_tokens(per_view, (r, max_tiles // r)) for r in range(1, max_tiles + 1)) if max_tiles else per_view


def token_count(per_view: int, max_tiles: int = 0) -> str:
    """How many tokens an image takes, in words (the training log, check_data.py)."""
    if not max_tiles:
        return f"{per_view} tokens per image"
    most = most_image_tokens(per_view, max_tiles)
    return (f"tiled (max_tiles={max_tiles}): {per_view} tokens per view, {per_view} per image (a grid of 1x1, "
            f"the global view alone) to {most}")


def tile_tokens(views, grids, newline):
    """(total views, M, D) connector outputs, each image's views consecutive (global, then tiles row-major) ->
    (sum of image_tokens, D): per image the global view's M tokens, newline, then for each row of tiles its tiles'
    tokens left to right and a newline (LLaVA-NeXT's learned image_newline, one per tile row instead of per
    feature row: tiles are not merged into one feature map); a 1x1 image is its global view alone, as untiled. One
    gather: the views' tokens in order, the newline (the last row of `flat`, so it always has a gradient, zero when
    unused: DDP needs none missing) after the global view and after each row of tiles."""
    m, flat = views.shape[1], torch.cat([views.flatten(0, 1), newline.to(views.dtype)[None]])
    index, v = [], 0
    for rows, cols in (g.tolist() if torch.is_tensor(g) else g for g in grids):
        tiled = rows * cols > 1
        for width in [1] + [cols] * rows * tiled:   # the global view, then each row of tiles
            index += [*range(v * m, (v + width) * m)] + [len(flat) - 1] * tiled
            v += width
    if v != views.shape[0]:
        raise ValueError(f"{views.shape[0]} views for grids that have {v}")
    return flat[torch.tensor(index, dtype=torch.long, device=views.device)]

    def extra_repr(self):
        return f"name={self.name!r}"


def attend(q, k, v, heads: int, dropout: float = 0.0):
    """Multi-head softmax attention on (B, L, heads*dh) tensors, scores scaled by dh**-0.5; returns (B, Lq, heads*dh).
    Heads are contiguous slices of the feature dim (Flamingo's 'b n (h d)' and BERT's layout)."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, L, dh)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=dropout)
    return out.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------- MLP family

def mlp_gelu(in_dim: int, dim: int, depth: int) -> nn.Sequential:
    """LLaVA's mlp{depth}x_gelu: Linear(in, D), then (depth-1) x [GELU (exact erf), Linear(D, D)]; keys 0, 2, 4, ..."""
    if depth < 1:
        raise ValueError(f"mlp{depth}x_gelu: the depth must be >= 1")
    layers = [nn.Linear(in_dim, dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(dim, dim)]
    return nn.Sequential(*layers)


class MoFMLP(nn.Module):
    """Interleaved Mixture-of-Features ("Eyes Wide Shut", Tong et al. 2024): one mlp2x_gelu per tower, outputs
    interleaved token by token (out[:, 0::2] = clip, out[:, 1::2] = dino), so both towers must give N tokens.
    TinyLLaVA required DINO's width to equal CLIP's; here it may differ (dino_dim)."""

    def __init__(self, clip_dim: int, dino_dim: int, dim: int):
        super().__init__()
        self.clip = mlp_gelu(clip_dim, dim, 2)
        self.dinov2 = mlp_gelu(dino_dim, dim, 2)

    def forward(self, feats):
        clip, dino = feats
        self.num_tokens((clip.shape[1], dino.shape[1]))  # validates the token counts
        return torch.stack([self.clip(clip), self.dinov2(dino)], dim=2).flatten(1, 2)  # (B, N, 2, D) -> (B, 2N, D)

    def num_tokens(self, n_in):
        if not isinstance(n_in, (tuple, list)) or len(n_in) != 2:
            raise TypeError(f"mof_mlp counts tokens of a pair (n_clip, n_dino), got {n_in!r}")
        if n_in[0] != n_in[1]:
            raise ValueError(f"mof_mlp interleaves token by token: CLIP gave {n_in[0]} tokens, DINOv2 {n_in[1]}")
        return n_in[0] + n_in[1]


def grid_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pixel shuffle needs a square token grid, got {n} tokens "
                         "(SigLIP with TinyLLaVA's first-token drop gives 728: keep all 729)")
    return side


def pixel_shuffle(x, scale: int):
    """Space-to-depth on the square token grid: (B, s*s, C) -> (B, ceil(s/scale)**2, scale*scale*C).
    Output token (i, j) concatenates, row-major, the scale x scale block of input tokens starting at (i*scale, j*scale)
    (4x4 grid, scale 2: output 0 = inputs 0, 1, 4, 5), nanoVLM's order. A side not divisible by scale is zero-padded
    at the bottom/right (SigLIP so400m: 27x27 -> 28x28 -> 196 tokens) instead of cropped, so no patch is lost."""
    b, n, c = x.shape
    side = grid_side(n)
    pad = -side % scale
    grid = F.pad(x.reshape(b, side, side, c), (0, 0, 0, pad, 0, pad))  # pads (C, cols, rows): right and bottom only
    h = (side + pad) // scale
    grid = grid.view(b, h, scale, h, scale, c).permute(0, 1, 3, 2, 4, 5)  # (B, block row, block col, dy, dx, C)
    return grid.reshape(b, h * h, scale * scale * c)


class PixelShuffleMLP(nn.Sequential):
    """pixel_shuffle(S) then mlp{K}x_gelu from Dv*S*S to D. Being the Sequential itself keeps the mlp's keys
    (`_connector.0.*`, `_connector.2.*`, ...); the shuffle has no parameters."""

    def __init__(self, scale: int, in_dim: int, dim: int, depth: int):
        if scale < 1:
            raise ValueError(f"pixel_shuffle{scale}: the scale must be >= 1")
        super().__init__(*mlp_gelu(in_dim * scale * scale, dim, depth))
        self.scale = scale

    def forward(self, x):
        return super().forward(pixel_shuffle(x, self.scale))

    def num_tokens(self, n_in):
        return ((grid_side(n_in) + self.scale - 1) // self.scale) ** 2  # ceil(side / S) ** 2


# ---------------------------------------------------------------------------------------------- Perceiver Resampler

class PerceiverAttention(nn.Module):
    """Flamingo's latents-attend-to-media block: keys/values come from concat(media, latents)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm_media(x), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attend(self.to_q(latents), k, v, self.heads))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))  # keys .0, .1, .3 as in Flamingo/TinyLLaVA


class PerceiverResampler(nn.Module):
    """Linear(Dv, D), then num_layers x [latents += attn(x, latents); latents += ff(latents)], then LayerNorm."""

    def __init__(self, in_dim, dim, num_queries=128, num_layers=3, heads=8, dim_head=64):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_queries, dim))  # std 1 as in Flamingo; not touched by init
        self.linear = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim)])
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.linear(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)

    def num_tokens(self, n_in):
        return self.latents.shape[0]


# ---------------------------------------------------------------------------------------------- Q-Former

class QFormerAttention(nn.Module):
    """BERT-style attention: q/k/v/out projections with biases and dropout; the residual + LayerNorm is the layer's."""

    def __init__(self, dim: int, heads: int, kv_dim: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, context):
        p = self.dropout if self.training else 0.0
        return self.drop(self.out(attend(self.q(x), self.k(context), self.v(context), self.heads, p)))


class QFormerLayer(nn.Module):
    """Post-LN BERT layer on the queries: self-attention, optional cross-attention to the image (K/V from Dv), FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, kv_dim: int | None):
        super().__init__()
        self.self_attn = QFormerAttention(dim, heads, dim, dropout)
        self.self_norm = nn.LayerNorm(dim, eps=1e-12)  # BERT's eps
        self.cross_attn = QFormerAttention(dim, heads, kv_dim, dropout) if kv_dim else None
        self.cross_norm = nn.LayerNorm(dim, eps=1e-12) if kv_dim else None
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim), nn.Dropout(dropout))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, q, image):
        q = self.self_norm(q + self.self_attn(q, q))
        if self.cross_attn is not None:
            q = self.cross_norm(q + self.cross_attn(q, image))
        return self.ffn_norm(q + self.ffn(q))


class QFormer(nn.Module):
    """BLIP-2's query branch, written out instead of vendoring BERT. Defaults are TinyLLaVA's BERT-base config
    (hidden 768, 12 heads, 12 layers, FFN 3072, dropout 0.1, cross-attention in layers 0, 2, ..., 10), randomly
    initialised as there (it loaded no BERT weights). Text branch, word/position embeddings: dropped, as there."""

    def __init__(self, in_dim, dim, num_queries=128, hidden=768, heads=12, layers=12, ffn_dim=3072,
                 cross_freq=2, dropout=0.1):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"qformer: hidden {hidden} is not divisible by heads {heads}")
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden) * INIT_STD)  # BLIP-2: N(0, 0.02)
        self.norm = nn.LayerNorm(hidden, eps=1e-12, elementwise_affine=False)  # non-affine, as TinyLLaVA made it
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(QFormerLayer(hidden, heads, ffn_dim, dropout, in_dim if i % cross_freq == 0 else None)
                                    for i in range(layers))
        self.projector = nn.Linear(hidden, dim)

    def forward(self, x):
        q = self.drop(self.norm(self.query_tokens.expand(x.shape[0], -1, -1)))
        for layer in self.layers:
            q = layer(q, x)
        return self.projector(q)

    def num_tokens(self, n_in):
        return self.query_tokens.shape[1]


# ---------------------------------------------------------------------------------------------- registry

def _identity(m, dv, d, o):
    if dv != d:
        raise ValueError(f"the identity connector needs vision_dim == llm_dim, got {dv} and {d}")
    return nn.Identity()


# full-match regex -> builder(match, vision_dim, llm_dim, options); exactly one key may match a name
CONNECTORS = {
    "identity": _identity,
    "linear": lambda m, dv, d, o: nn.Linear(dv, d),
    r"mlp(\d+)x_gelu": lambda m, dv, d, o: mlp_gelu(dv, d, int(m[1])),
    "mof_mlp": lambda m, dv, d, o: MoFMLP(dv, o["vision_dim2"] or dv, d),
    "resampler": lambda m, dv, d, o: PerceiverResampler(dv, d, o["num_queries"], o["num_layers"],
                                                        o["resampler_heads"], o["resampler_dim_head"]),
    "qformer": lambda m, dv, d, o: QFormer(dv, d, o["num_queries"], o["qformer_hidden"], o["qformer_heads"],
                                           o["qformer_layers"], o["qformer_ffn"], o["qformer_cross_freq"],
                                           o["qformer_dropout"]),
    r"pixel_shuffle(\d+)_mlp(\d+)x_gelu": lambda m, dv, d, o: PixelShuffleMLP(int(m[1]), dv, d, int(m[2])),
}


def _init_tinyllava(module):
    # TinyLLaVA's _init_weights: in practice it only reaches the connector (LLM and tower are loaded afterwards).
    # LayerNorms keep PyTorch's 1/0, which is what it sets too; latents/query tokens keep their own init.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_connector(name: str, vision_dim: int, llm_dim: int, *,
                    vision_dim2: int | None = None,  # mof_mlp: DINOv2 width (default: vision_dim)
                    num_queries: int = 128,  # resampler / qformer output tokens
                    num_layers: int = 3, resampler_heads: int = 8, resampler_dim_head: int = 64,
                    qformer_hidden: int = 768, qformer_heads: int = 12, qformer_layers: int = 12,
                    qformer_ffn: int = 3072, qformer_cross_freq: int = 2, qformer_dropout: float = 0.1,
                    init: str = "tinyllava",  # tinyllava: Linear N(0, 0.02), bias 0 | torch: defaults
                    newline: bool = False) -> Connector:  # tiling: an image_newline embedding (Connector)
    """Build the connector called `name`; options a connector does not use are ignored."""
    if init not in ("tinyllava", "torch"):
        raise ValueError(f"init must be 'tinyllava' or 'torch', got {init!r}")
    hits = [(m, build) for pattern, build in CONNECTORS.items() if (m := re.fullmatch(pattern, name))]
    if not hits:
        raise ValueError(f"unknown connector {name!r}; valid names/patterns: {', '.join(CONNECTORS)}")
    match, build = hits[0]
    options = dict(vision_dim2=vision_dim2, num_queries=num_queries, num_layers=num_layers,
                   resampler_heads=resampler_heads, resampler_dim_head=resampler_dim_head,
                   qformer_hidden=qformer_hidden, qformer_heads=qformer_heads, qformer_layers=qformer_layers,
                   qformer_ffn=qformer_ffn, qformer_cross_freq=qformer_cross_freq, qformer_dropout=qformer_dropout)
    connector = Connector(name, build(match, vision_dim, llm_dim, options), llm_dim, newline)
    if init == "tinyllava":
        connector.apply(_init_tinyllava)
    return connector

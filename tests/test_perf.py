"""The optimisations leave results unchanged, and the speed accounting is right: cached tower features give the
same loss and gradients as running the tower; the cache is keyed by everything the features depend on; the
analytic FLOP count matches torch's FlopCounterMode; an interrupted cache fill leaves no partial entries; the
bench's shapes keep the FLOP shares of the models they stand for and run; its re-created original loop computes our
loss; the scripts start without the heavy packages and a plain training run never imports peft, bitsandbytes or
DeepSpeed."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench
import flops
from data import VLMDataset, collate
from model import FeatureCache, ModelArgs, build_model, image_size
from conftest import write_dataset


def frozen_tower_model(tiny_llms, tiny_towers, **kw):
    torch.manual_seed(0)
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"], **kw))
    model.vision_tower.requires_grad_(False)
    return model, tok, proc


def test_cached_features_give_the_same_loss_and_gradients(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = frozen_tower_model(tiny_llms, tiny_towers)
    path, images = write_dataset(str(tmp_path / "d"), n=8, text_only=2)
    cache = FeatureCache(str(tmp_path / "cache"), model, proc)
    ds = VLMDataset(path, tok, proc, "llama", model.num_image_tokens, 512, images)
    done, failed = cache.fill(model, [r["image"] for r in ds.records if r.get("image")], images, batch_size=3)
    assert (done, failed) == (8, 0)
    assert cache.fill(model, [r["image"] for r in ds.records if r.get("image")], images) == (0, 0)   # reused
    cached = VLMDataset(path, tok, proc, "llama", model.num_image_tokens, 512, images, feature_cache=cache)
    idx = [0, 1, 2, 8, 3]   # images and a text-only row
    a, b = collate([ds[i] for i in idx], tok.unk_token_id), collate([cached[i] for i in idx], tok.unk_token_id)
    assert b["images"] is None and b["tower_features"].shape[0] == a["images"].shape[0] == 4
    grads = []
    for batch in (a, b):
        model.zero_grad()
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], images=batch["images"],
                    tower_features=batch["tower_features"])
        out["loss_sum"].backward()
        grads.append((out["loss_sum"].item(), [p.grad.clone() for p in model.connector.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_the_cache_is_keyed_by_everything_the_features_depend_on(tiny_llms, tiny_towers, tmp_path):
    model, _, proc = frozen_tower_model(tiny_llms, tiny_towers)
    root = str(tmp_path)
    key = FeatureCache(root, model, proc).dir
    assert FeatureCache(root, model, proc).dir == key
    other_layer, _, _ = frozen_tower_model(tiny_llms, tiny_towers, vision_feature_layer=-3)
    pad, _, _ = frozen_tower_model(tiny_llms, tiny_towers, image_aspect_ratio="pad")
    drop, _, _ = frozen_tower_model(tiny_llms, tiny_towers, legacy_patch_drop=True)
    assert len({key, FeatureCache(root, other_layer, proc).dir, FeatureCache(root, pad, proc).dir,
                FeatureCache(root, drop, proc).dir}) == 4
    with torch.no_grad():
        next(model.vision_tower.parameters()).add_(1e-3)   # a tower trained in an earlier stage
    assert FeatureCache(root, model, proc).dir != key
    proc2 = type(proc).from_dict({**proc.to_dict(), "image_mean": [0.4, 0.4, 0.4]})
    assert FeatureCache(root, model, proc2).dir != FeatureCache(root, model, proc).dir


def test_an_edited_image_misses_the_cache_and_an_unreadable_one_is_reported(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = frozen_tower_model(tiny_llms, tiny_towers)
    path, images = write_dataset(str(tmp_path / "d"), n=3, text_only=0)
    cache = FeatureCache(str(tmp_path / "cache"), model, proc)
    with open(os.path.join(images, "2.png"), "wb") as f:
        f.write(b"not a png")
    assert cache.fill(model, ["0.png", "1.png", "2.png", "gone.png"], images) == (2, 1)
    assert cache.load(images, "0.png") is not None and cache.load(images, "2.png") is None
    os.utime(os.path.join(images, "0.png"), ns=(1, 1))   # touched: its entry no longer applies
    assert cache.load(images, "0.png") is None
    assert not [f for _, _, fs in os.walk(cache.dir) for f in fs if f.endswith(".tmp")]
    ds = VLMDataset(path, tok, proc, "llama", model.num_image_tokens, 512, images, feature_cache=cache)
    with pytest.raises(ValueError, match=r"record 2 .*cannot read image"):
        ds[2]


@pytest.mark.parametrize("tune", [("connector",), ("llm", "connector"), ("vision_tower", "connector")])
def test_flop_accounting_matches_torch_flop_counter(tiny_llms, tiny_towers, tmp_path, tune):
    """Forward + backward of one padding-free batch: train_flops == FlopCounterMode's count (SDPA counted full)."""
    from torch.utils.flop_counter import FlopCounterMode
    model, tok, proc = frozen_tower_model(tiny_llms, tiny_towers, attn_implementation="eager")
    for name, part in [("llm", model.language_model), ("vision_tower", model.vision_tower),
                       ("connector", model.connector)]:
        part.requires_grad_(name in tune)
    path, images = write_dataset(str(tmp_path / "d"), n=4, text_only=0)
    ds = VLMDataset(path, tok, proc, "llama", model.num_image_tokens, 512, images)
    same = [i for i in range(len(ds)) if len(ds[i]["input_ids"]) == len(ds[1]["input_ids"])][:2]
    batch = collate([ds[i] for i in same], tok.unk_token_id)
    assert bool(batch["attention_mask"].all())   # no padding: every counted token is real
    profile = flops.flop_profile(model, image_size(proc))
    with FlopCounterMode(display=False) as counter:
        model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
              images=batch["images"])["loss_sum"].backward()
    ours = flops.train_flops(profile, batch["attention_mask"], batch["labels"], len(same))
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.05)
    parts = flops.train_flops(profile, batch["attention_mask"], batch["labels"], len(same), parts=True)
    assert set(parts) == set(flops.PARTS) and sum(parts.values()) == pytest.approx(ours)


def test_matmul_peak_is_measured():
    peak = flops.matmul_peak(torch.float32, n=256, seconds=0.2)
    assert 1e8 < peak < 1e14


def test_cached_feature_training_equals_uncached_step_for_step(tiny_llms, tiny_towers, tmp_path, monkeypatch):
    """train.py with --feature_cache: the same losses and weights as running the frozen tower every step; a second
    run (next stage, next run) computes nothing new."""
    from accelerate.state import AcceleratorState
    import train
    from model import load_pretrained
    data, images = write_dataset(str(tmp_path / "d"), n=12, text_only=4)

    def run(out, *extra):
        AcceleratorState._reset_state(True)
        return train.main([f"--llm={tiny_llms['llama']}", f"--vision_tower={tiny_towers['siglip']}",
                           "--template=llama", f"--data_finetune={data}", f"--images_finetune={images}",
                           f"--out_dir={out}", "--bf16=false", "--num_workers=0", "--max_length=256",
                           "--global_batch_size=4", "--micro_batch_size=2", "--max_steps=4", "--peak_flops=1e10",
                           "--stages=[{'name': 'finetune', 'tune_llm': 'full', 'tune_vision_tower': 'frozen'}]",
                           *extra])
    plain, plain_losses = run(tmp_path / "plain")
    cached, cached_losses = run(tmp_path / "cached", f"--feature_cache={tmp_path / 'cache'}")
    assert cached_losses["finetune"] == pytest.approx(plain_losses["finetune"], rel=1e-5)
    a, b = load_pretrained(plain)[0].state_dict(), load_pretrained(cached)[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    entries = lambda: sorted(f for _, _, fs in os.walk(tmp_path / "cache") for f in fs)  # noqa: E731
    assert len(entries()) == 12
    before = {f: os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(tmp_path / "cache") for f in fs}
    import model as model_py
    real, calls = model_py.VisionTower.forward, []
    monkeypatch.setattr(model_py.VisionTower, "forward", lambda self, x: calls.append(len(x)) or real(self, x))
    run(tmp_path / "again", f"--feature_cache={tmp_path / 'cache'}")
    assert calls == [1]   # only the one-image FLOP count: training read every feature from the cache
    after = {f: os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(tmp_path / "cache") for f in fs}
    assert after == before   # reused, not rewritten


def test_phi2_shape_keeps_the_full_size_shares():
    """The scaled Phi-2 + SigLIP-so400m shape: each part's share of a step's model FLOPs (tower, LLM body,
    attention, head; the connector within 1.5 points), image vs text tokens and answer vs prompt as at full size."""
    shape = bench.SHAPES["phi2_siglip"]
    for stage in ("pretrain", "finetune"):
        full_len = bench.synthetic_lengths("phi2_siglip", stage, 400, scale=1)
        small_len = bench.synthetic_lengths("phi2_siglip", stage, 400)
        full = flops.shares(flops.analytic_profile(*shape["full"], stage), full_len, 729)
        small = flops.shares(flops.analytic_profile(shape["llm"], shape["tower"], stage), small_len, 81)
        for part in ("tower", "llm", "attention", "head"):
            assert small[part] == pytest.approx(full[part], rel=0.1), (stage, part)
        assert abs(small["connector"] - full["connector"]) < 0.015
        text = lambda lens, i: sum(x[i] for x in lens) / len(lens)  # noqa: E731
        assert 81 / (text(small_len, 0) + text(small_len, 1)) == pytest.approx(
            729 / (text(full_len, 0) + text(full_len, 1)), rel=0.1)
        if stage == "finetune":
            assert text(small_len, 1) / text(small_len, 0) == pytest.approx(text(full_len, 1) / text(full_len, 0),
                                                                            rel=0.1)


def test_bench_pictures_take_their_full_size_grids():
    """bench.py's synthetic pictures, scaled as the shape scales the tower's input (126 / 384 px), get the grids that
    the real pictures get at full size, so tiled samples keep the real views and tokens per image (/ 9)."""
    from modeling_tinyllava_nano import choose_grid
    small, full = bench.SHAPES["phi2_siglip"]["tower"][4], bench.SHAPES["phi2_siglip"]["full"][1][4]
    for max_tiles in (4, 9):
        for w, h in bench.PICTURES:
            assert choose_grid(round(w * small / full), round(h * small / full), (small, small), max_tiles) == \
                choose_grid(w, h, (full, full), max_tiles), (max_tiles, w, h)


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench") / "smoke")
    bench.make_base(root, "smoke")
    return root


def test_analytic_flops_match_the_built_model(smoke_base):
    """analytic_profile (sizes alone, how the full-size shares are computed) == flop_profile of the built model."""
    model, _, _ = build_model(ModelArgs(llm=f"{smoke_base}/llm", vision_tower=f"{smoke_base}/siglip"))
    for stage, trains in (("pretrain", ("connector",)), ("finetune", ("llm", "connector"))):
        for name, part in [("llm", model.language_model), ("vision_tower", model.vision_tower),
                           ("connector", model.connector)]:
            part.requires_grad_(name in trains)
        built = flops.flop_profile(model, model.image_size)
        spec = flops.analytic_profile(bench.SHAPES["smoke"]["llm"], bench.SHAPES["smoke"]["tower"], stage)
        for k in ("dec", "head", "layers", "dec_trainable", "d_attn", "llm_trains", "conn_trains", "tower_trains"):
            assert built[k] == spec[k], (stage, k)
        assert built["per_image"] == pytest.approx(spec["per_image"], rel=0.01)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bench_variants_run_and_the_original_loop_computes_our_loss(smoke_base, stage):
    """Every variant of a bench step runs on the smoke shape, and original_loss (every row through the tower, zero
    images for text-only rows, logits at every position, mean cross-entropy) equals ours, gradients too."""
    from argparse import Namespace
    a = Namespace(shape="smoke", root=smoke_base, device="cpu", dtype="float32", micro_batch=2, warmup=1,
                  samples=3, profile=True)
    for variant in ("original", "ours", "ours+ckpt", "ours+cache", "ours+tiles4+ps3"):
        r = bench.run_variant(a, stage, variant)
        assert r["samples_s"] > 0 and r["step_mib"] >= 0 and r["proc_mib"] > 0, variant
        assert variant == "original" or r["flops"] == pytest.approx(sum(r["flop_parts"].values()))
        assert ("profile" in r) == (variant == "ours")
        assert r["grids"] == ({"2x2": 3} if "tiles" in variant else {}), variant   # the smoke pictures: 2x2 each
        assert r["image_tokens"] == (1 * 5 + 3 if "tiles" in variant else 9), variant   # ps3: 3x3 -> 1 per view
    torch.manual_seed(0)
    model, tok, proc = build_model(ModelArgs(llm=f"{smoke_base}/llm", vision_tower=f"{smoke_base}/siglip"))
    model.vision_tower.requires_grad_(False)
    items, _, _ = bench.samples(a, stage, model, tok, proc)
    text_only = dict(items[0], pixel_values=None, labels=items[0]["labels"][model.num_image_tokens:],
                     input_ids=items[0]["input_ids"][model.num_image_tokens:])
    for rows in (items[:2], [text_only, items[1]], [text_only]):
        b = collate(rows, tok.pad_token_id)
        grads = []
        for original in (True, False):
            model.zero_grad()
            loss = bench.original_loss(model, b) if original else (lambda o: o["loss_sum"] / o["num_tokens"])(
                model(b["input_ids"], b["attention_mask"], labels=b["labels"], images=b["images"]))
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.connector.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
        for g0, g1 in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)


def test_bench_driver_end_to_end(tmp_path):
    """`python bench.py` as a user runs it (each variant in its own process), shrunk to seconds."""
    r = bench.main(["--shapes", "smoke", "--root", str(tmp_path), "--stages", "finetune", "--only", "train",
                    "--variants", "original,ours", "--rounds", "1", "--samples", "2", "--micro-batch", "2",
                    "--out", str(tmp_path / "r.json")])
    assert r["dtype"] == "float32" and r["peak_flops"]["float32"] > 1e9
    runs = r["smoke"]["finetune"]["runs"]
    assert set(runs) == {"original", "ours"} and all(x[0]["samples_s"] > 0 for x in runs.values())
    assert r["smoke"]["finetune"]["profile"]["step"] > 0 and os.path.isfile(tmp_path / "r.json")


HEAVY = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed")


@pytest.mark.parametrize("script", ["train.py", "bench.py", "chat.py", "evaluate.py", "check_data.py", "demo.py",
                                    "convert.py"])
def test_help_loads_no_heavy_package(script):
    """--help of every script is answered from the standard library alone (no torch: it takes seconds to import)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import runpy, sys\nsys.argv = [sys.argv[1], '--help']\ntry:\n    runpy.run_path(sys.argv[0], "
            f"run_name='__main__')\nexcept SystemExit:\n    pass\nprint([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, script], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]" and "--" in out.stdout   # the help, printed


def test_a_plain_training_run_imports_no_peft_bitsandbytes_or_deepspeed(tiny_llms, tiny_towers, tmp_path):
    """A stage without LoRA / QLoRA / ZeRO imports none of peft, bitsandbytes and DeepSpeed, from start to its final
    save (peft alone is 0.4 GB and seconds; Accelerate's get_state_dict imports DeepSpeed wherever it is installed,
    so train.final_state calls it for sharded runs only); importing train.py, recipes.py or checkpoints.py does
    not load torch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data, images = write_dataset(str(tmp_path / "d"), n=4, text_only=1)
    args = [f"--llm={tiny_llms['llama']}", f"--vision_tower={tiny_towers['siglip']}", "--template=llama",
            f"--data_finetune={data}", f"--images_finetune={images}", f"--out_dir={tmp_path / 'out'}", "--bf16=false",
            "--num_workers=0", "--max_length=256", "--global_batch_size=2", "--micro_batch_size=2", "--max_steps=2",
            "--save_every=1", "--peak_flops=1e10", "--threads=1",
            "--stages=[{'name': 'finetune', 'tune_llm': 'full', 'tune_vision_tower': 'frozen'}]"]
    code = ("import sys, json\nimport train, recipes, checkpoints\nlight = 'torch' not in sys.modules\n"
            "real, seen = train.final_state, []\n"
            "train.final_state = lambda *a: seen.append(a[0].distributed_type.value) or real(*a)\n"
            "train.main(json.loads(sys.argv[1]))\n"
            "print(json.dumps([light, seen, [m for m in ('peft', 'bitsandbytes', 'deepspeed') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, cwd=root,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    light, seen, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert light and seen == ["NO"] and loaded == []   # seen: the final save ran, unsharded


@pytest.mark.parametrize("cap", [None, 2.0])
def test_linear_cross_entropy_equals_head_plus_cross_entropy(cap):
    """The chunked loss with its gradients formed in the forward, against logits + F.cross_entropy: Gemma-2's
    logit soft-capping, a bias, an uneven last chunk, a scaled backward that runs once, and no gradients
    formed when none are wanted."""
    from model import LinearCrossEntropy
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(7, 5), torch.randn(11, 5), torch.randn(11)
    targets = torch.randint(0, 11, (7,))

    def run(fused):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if fused:
            loss = LinearCrossEntropy.apply(h, w, b, targets, cap, 3, True)
        else:
            z = F.linear(h, w, b)
            loss = F.cross_entropy(torch.tanh(z / cap) * cap if cap else z, targets, reduction="sum")
        (0.7 * loss).backward()
        return loss.detach(), h.grad, w.grad, b.grad
    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_()
    loss = LinearCrossEntropy.apply(hidden, w, None, targets, cap, 3, True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):   # its gradients were scaled in place and handed on
        loss.backward()
    # grads=False (model.forward passes torch.is_grad_enabled(): validation): the loss alone, no gradient formed
    loss = LinearCrossEntropy.apply(hidden, weight.clone().requires_grad_(), None, targets, cap, 3, False)
    assert loss.grad_fn.grads == (None, None, None)
    z = F.linear(hidden, weight)
    want = F.cross_entropy(torch.tanh(z / cap) * cap if cap else z, targets, reduction="sum")
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)


def test_only_plain_heads_take_the_chunked_loss():
    """A wrapped, quantised, ZeRO-3-partitioned or hooked head goes through its own forward (logits at once)."""
    from model import plain_linear
    assert plain_linear(nn.Linear(4, 8))

    class Quantised(nn.Linear):
        pass
    empty = nn.Linear(4, 8)
    empty.weight = nn.Parameter(torch.empty(0))          # what ZeRO-3 leaves outside the module's forward
    hooked = nn.Linear(4, 8)
    hooked.register_forward_pre_hook(lambda m, a: None)  # e.g. a gather before the forward
    assert not any(plain_linear(m) for m in (Quantised(4, 8), empty, hooked))


def test_linear_cross_entropy_under_bf16_autocast_is_closer_to_float32():
    """train.py's default (bf16 autocast): the chunked loss runs and its gradients are at least as close to the
    float32 ones as the logits-at-once path's (it accumulates the head's weight gradient in float32)."""
    from model import LinearCrossEntropy
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(70, 64), torch.randn(1000, 64) * 0.1, torch.randn(1000) * 0.1
    targets = torch.randint(0, 1000, (70,))

    def grads(fused, autocast):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (LinearCrossEntropy.apply(h, w, b, targets, None, 16, True) if fused else
                    F.cross_entropy(F.linear(h, w, b).float(), targets, reduction="sum"))
            loss.backward()
        return h.grad, w.grad, b.grad
    exact = grads(False, False)
    for ours, theirs, want in zip(grads(True, True), grads(False, True), exact):
        assert ours.dtype == want.dtype
        assert (ours - want).abs().max() <= (theirs - want).abs().max() * 1.01 + 1e-6


def test_phi_gelu_runs_as_one_kernel_and_keeps_the_logits_and_gradients(tiny_llms, tiny_towers, tmp_path):
    """Phi's gelu_new (eight elementwise ops in HF's code) runs as F.gelu(approximate="tanh"): the same function,
    so the logits and gradients equal HF's own op for op within float rounding; the saved config still says
    gelu_new (every other reader builds the checkpoint as before)."""
    import model as model_py
    from transformers.activations import GELUTanh, NewGELUActivation
    args = model_py.ModelArgs(llm=tiny_llms["phi"], vision_tower=tiny_towers["siglip"])
    ids = torch.randint(0, 100, (2, 12))

    def run(fused):
        model_py.FUSED_GELU = fused
        try:
            torch.manual_seed(0)
            m, tok, proc = model_py.build_model(args)
        finally:
            model_py.FUSED_GELU = True
        acts = {type(x) for x in m.language_model.modules()} & {GELUTanh, NewGELUActivation}
        logits = m.language_model(input_ids=ids).logits
        logits.square().mean().backward()
        return m, tok, proc, acts, logits.detach(), [p.grad for p in m.language_model.parameters()]
    m, tok, proc, acts, logits, grads = run(True)
    _, _, _, acts_hf, logits_hf, grads_hf = run(False)
    assert acts == {GELUTanh} and acts_hf == {NewGELUActivation}
    torch.testing.assert_close(logits, logits_hf, rtol=1e-5, atol=1e-6)
    for g, want in zip(grads, grads_hf):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
    model_py.save_pretrained(m, tok, proc, str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "config.json") as f:
        assert json.load(f)["text_config"]["hidden_act"] == "gelu_new"


def test_tensor_memory_counts_what_a_step_makes_and_frees():
    """bench.py's step memory: tensors made inside the block, each from its op until it is freed; views and in-place
    results of tensors made outside (the weights) are not new memory; a backward's gradients count."""
    from flops import TensorMemory
    mib = 1000 * 1000 * 4 / 2 ** 20
    w = torch.randn(1000, 1000, requires_grad=True)
    with TensorMemory() as m:
        wt = w.t()                 # a view of an outside tensor: nothing new
        a = torch.zeros(1000, 1000)
        a.add_(1)                  # in place: nothing new
        b = a * 2
        del a
        c = b + 1                  # a freed first: two live, never three
        del wt
    assert m.peak == pytest.approx(2 * mib * 2 ** 20) and m.bytes == pytest.approx(2 * mib * 2 ** 20)
    del b, c
    with TensorMemory() as m:      # x, relu(x) (kept for the backward); then its gradients: ones, relu's, w.grad
        (w @ w).relu().sum().backward()
    assert 3 * mib <= m.peak / 2 ** 20 <= 5 * mib


def test_fused_adamw_as_train_py_builds_it_equals_the_for_loop_one():
    """train.py's AdamW is torch's fused kernel (outside DeepSpeed / FSDP): with its parameter groups (per component,
    decay / no decay) and clipping, five steps give the for-loop AdamW's weights within float rounding."""
    import copy
    import types
    from recipes import DEFAULTS, param_groups
    torch.manual_seed(0)
    parts = dict(language_model=nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)),
                 vision_tower=nn.Linear(4, 16).requires_grad_(False), connector=nn.Linear(16, 16))
    cfg = {**DEFAULTS, "lr": 1e-2, "weight_decay": 0.1}
    weights = {}
    for fused in (False, True):
        m = types.SimpleNamespace(**copy.deepcopy(parts))
        opt = torch.optim.AdamW(param_groups(m, cfg), betas=(0.9, 0.999), fused=fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            m.language_model(m.connector(torch.randn(4, 16, generator=g))).square().mean().backward()
            torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights[fused] = [p.detach() for part in (m.language_model, m.connector) for p in part.parameters()]
    for a, b in zip(weights[False], weights[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = [p for part in ("language_model", "connector") for p in parts[part].parameters()]
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(weights[True], before))   # every weight trained


@pytest.mark.parametrize("arg", ["--shapes=phi2_siglip,bogus", "--only=train,bogus", "--variants=ours,xx",
                                 "--stages=pretrain,warmup"])
def test_bench_refuses_a_mistyped_name_in_one_line(arg):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "bench.py", arg], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 2 and "each must be one of" in out.stderr and "Traceback" not in out.stderr


def test_free_memory_without_proc_falls_back_to_half_the_machine_then_to_none(monkeypatch):
    """auto checkpointing on a CPU compares a step with flops.free_mib: MemAvailable on Linux; on a system without
    /proc (macOS) half the physical memory; where nothing tells, 0 (checkpointing goes on)."""
    import builtins
    linux = flops.free_mib(torch.device("cpu"))
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_proc)
    half = flops.free_mib(torch.device("cpu"))
    assert 0 < linux and half == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / 2 ** 20
    monkeypatch.delattr(os, "sysconf")
    assert flops.free_mib(torch.device("cpu")) == 0.0

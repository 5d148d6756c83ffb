"""The optimisations leave results unchanged, and the speed accounting is right: cached tower features give the
same loss and gradients as running the tower; the cache is keyed by everything the features depend on; the
analytic FLOP count matches torch's FlopCounterMode; an interrupted cache fill leaves no partial entries; the bench
driver runs end to end."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench
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
    profile = bench.flop_profile(model, image_size(proc))
    with FlopCounterMode(display=False) as counter:
        model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
              images=batch["images"])["loss_sum"].backward()
    ours = bench.train_flops(profile, batch["attention_mask"], batch["labels"], len(same))
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_matmul_peak_is_measured():
    peak = bench.matmul_peak(torch.float32, n=256, seconds=0.2)
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


def test_bench_driver_end_to_end_on_the_tiny_model(tmp_path):
    """`python bench.py` as a user runs it (each variant in its own process), shrunk to seconds: every row has
    its measurements, grouping removes the padding, and batched answers equal one-by-one answers."""
    r = bench.main(["--size", "tiny", "--root", str(tmp_path), "--only", "pretrain,finetune,eval",
                    "--variants", "none,all", "--steps", "1", "--warmup", "1", "--rounds", "2",
                    "--micro-batch", "2", "--new-tokens", "2", "--eval-questions", "4",
                    "--out", str(tmp_path / "r.json")])
    assert r["dtype"] in ("float32", "bfloat16") and r["peak_flops"] > 1e9
    for stage in ("pretrain", "finetune"):
        assert set(r[stage]) == {"none", "all"}
        for row in r[stage].values():
            assert row["samples_s"] > 0 and row["tokens_s"] > row["samples_s"] and 0 < row["mfu"] < 1.5
            assert 0 <= row["padding"] < 1 and row["step_mib"] > 0 and row["peak_mib"] > row["step_mib"]
        assert "cache_fill_s" in r[stage]["all"] and "cache_fill_s" not in r[stage]["none"]
    assert r["finetune"]["all"]["padding"] < r["finetune"]["none"]["padding"]
    assert r["eval_2"]["identical_answers"] and r["eval_2"]["batch16"]["samples_s"] > 0
    assert os.path.isfile(tmp_path / "r.json")


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

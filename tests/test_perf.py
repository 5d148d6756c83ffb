"""The optimisations leave results unchanged, and the speed accounting is right: cached tower features give the
same loss and gradients as running the tower; the cache is keyed by everything the features depend on; the
analytic FLOP count matches torch's FlopCounterMode; an interrupted cache fill leaves no partial entries."""
import os

import pytest
import torch

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
    per_image = bench.image_flops(model, image_size(proc))
    with FlopCounterMode(display=False) as counter:
        model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
              images=batch["images"])["loss_sum"].backward()
    ours = bench.train_flops(model, batch["attention_mask"], batch["labels"], len(same), per_image)
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_matmul_peak_is_measured():
    peak = bench.matmul_peak(torch.float32, n=256, seconds=0.2)
    assert 1e8 < peak < 1e14

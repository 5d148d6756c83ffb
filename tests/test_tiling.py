"""Tiling (issue #28): the grid chosen from an image's shape, odd and tiny images, the global view, the token layout
(global view, newline, each row of tiles, newline), every tower and connector, truncation, the feature cache, a stage
that turns tiling on, a tiled folder in plain transformers, and the untiled path as it was. Expected grids and
counts are worked out by hand here (the docstrings say how), not by calling the code under test."""
import json
import os

import pytest
import torch
from PIL import Image

from conftest import IMAGE_SIZE, PATCH, run_train
from connectors import image_tokens
from data import IMAGE_TOKEN_INDEX, VLMDataset, collate, encode, model_inputs, preprocess_image, preprocess_views
from model import ModelArgs, build_model, load_pretrained, save_pretrained
from modeling_tinyllava_nano import choose_grid, tile_images

TILE = (IMAGE_SIZE, IMAGE_SIZE)
PER_VIEW = (IMAGE_SIZE // PATCH) ** 2   # 16 patch tokens per 32-px view (CLIP/DINOv2's CLS dropped by "patch")


@pytest.mark.parametrize("size, grid", [
    ((64, 64), (2, 2)),      # fills a 2x2 canvas exactly: every pixel kept, nothing padded
    ((64, 32), (1, 2)),      # fills 1x2 exactly
    ((32, 64), (2, 1)),
    ((32, 32), (1, 1)),      # one tile holds all of it; bigger grids keep no more pixels and pad more
    ((3, 3), (1, 1)),        # tiny: 9 pixels whatever the grid, least padding wins
    ((1, 1), (1, 1)),
    ((100, 30), (1, 4)),     # 1x3 scales to 96x28 (2688 of 3000 px kept); 1x4 keeps all 3000 with the least padding
    ((1, 15000), (4, 1)),    # a sliver: the tallest grid keeps the most rows (1 x 128 px), whatever the width
    ((15000, 1), (1, 4)),
    ((640, 480), (2, 2)),    # COCO: 2x2 scales it to 64x48 (3072 px), every other grid to at most 42x32
])
def test_the_grid_keeps_the_most_of_the_image_then_pads_the_least(size, grid):
    assert choose_grid(*size, TILE, 4) == grid


def test_the_grid_never_has_more_tiles_than_allowed():
    for w, h in [(1, 15000), (15000, 1), (5000, 5000), (333, 77)]:
        for n in (1, 2, 3, 6, 9):
            rows, cols = choose_grid(w, h, TILE, n)
            assert 1 <= rows * cols <= n
    assert choose_grid(5000, 5000, TILE, 9) == (3, 3) and choose_grid(5000, 5000, TILE, 8) == (2, 2)


def test_tiles_cut_the_scaled_image_row_by_row_and_the_global_view_is_todays_pixels(tiny_towers):
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(tiny_towers["siglip"])
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]   # top left, top right, bottom left, bottom right
    image = Image.new("RGB", (128, 128))
    for k, c in enumerate(colours):
        image.paste(Image.new("RGB", (64, 64), c), (64 * (k % 2), 64 * (k // 2)))
    tiles = tile_images(image, (2, 2), TILE, (0, 0, 0))
    assert [t.size for t in tiles] == [TILE] * 4
    assert [t.getpixel((16, 16)) for t in tiles] == colours
    views, grid = preprocess_views(image, proc, "square", 4)
    assert grid == (2, 2) and views.shape == (5, 3, *TILE)
    assert torch.equal(views[0], preprocess_image(image, proc, "square"))   # the global view: no tiling's pixels
    # SigLIP normalises to [-1, 1]: red tile is (1, -1, -1), the blue one (-1, -1, 1)
    assert views[1, :, 8, 8].tolist() == pytest.approx([1, -1, -1], abs=0.01)
    assert views[3, :, 8, 8].tolist() == pytest.approx([-1, -1, 1], abs=0.01)
    wide = Image.new("RGB", (64, 16), (255, 255, 255))   # 1x2, scaled to 64x16 and centred: grey padding above, below
    top, _ = tile_images(wide, (1, 2), TILE, (127, 127, 127))
    assert top.getpixel((5, 2)) == (127, 127, 127) and top.getpixel((5, 16)) == (255, 255, 255)


def test_odd_and_tiny_images_tile_without_blowing_up(tiny_towers):
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(tiny_towers["siglip"])
    for size, n_views in [((1, 15000), 5), ((15000, 1), 5), ((1, 1), 1), ((3, 3), 1), ((2, 40), 3)]:
        views, grid = preprocess_views(Image.new("RGB", size, (200, 10, 10)), proc, "square", 4)
        assert views.shape == (n_views, 3, *TILE) and torch.isfinite(views).all(), size
    assert preprocess_views(Image.new("RGB", (64, 64)), proc, "square", 0)[1] is None   # off: one view, no grid


def test_token_counts_per_image():
    # per view 16: a 1x1 image is its global view alone, as untiled; else the global view and a newline, then
    # rows x cols tiles and a newline per row
    assert image_tokens(16) == 16
    assert image_tokens(16, (1, 1)) == 16
    assert image_tokens(16, (1, 2)) == 16 * 3 + 2
    assert image_tokens(16, (2, 2)) == 16 * 5 + 3
    assert image_tokens(4, (4, 1)) == 4 * 5 + 5


def tiny(tiny_llms, tiny_towers, max_tiles, connector="mlp2x_gelu", tower="siglip", tower2=""):
    torch.manual_seed(0)
    args = ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers[tower], vision_tower2=tower2,
                     connector=connector, max_tiles=max_tiles, num_queries=8, num_resampler_layers=1)
    return build_model(args)


def test_the_layout_is_global_view_newline_then_each_tile_row_and_a_newline(tiny_llms, tiny_towers):
    model, _, proc = tiny(tiny_llms, tiny_towers, 4)
    a, ga = preprocess_views(Image.new("RGB", (64, 32), (200, 30, 30)), proc, "square", 4)   # 1x2: 3 views
    b, gb = preprocess_views(Image.new("RGB", (64, 64), (30, 30, 200)), proc, "square", 4)   # 2x2: 5 views
    with torch.no_grad():
        got = model.encode_images(torch.cat([a, b]), image_grids=torch.tensor([ga, gb]))
        f = model.connector._connector(model.vision_tower(torch.cat([a, b])))   # each view on its own
    nl = model.connector.image_newline[None]
    want = torch.cat([f[0], nl, f[1], f[2], nl,                       # image a: global, newline, row of 2, newline
                      f[3], nl, f[4], f[5], nl, f[6], f[7], nl])       # image b: global, newline, 2 rows of 2
    assert got.shape == (PER_VIEW * 8 + 5, 64) and torch.equal(got, want)
    c, gc = preprocess_views(Image.new("RGB", (30, 30), (30, 200, 30)), proc, "square", 4)   # 1x1: as untiled
    with torch.no_grad():
        alone = model.encode_images(c, image_grids=torch.tensor([gc]))
        assert gc == (1, 1) and torch.equal(alone, model.connector._connector(model.vision_tower(c))[0])


@pytest.mark.parametrize("tower, tower2, connector, per_view", [
    ("siglip", "", "mlp2x_gelu", 16), ("clip", "", "linear", 16), ("dinov2", "", "mlp2x_gelu", 16),
    ("siglip", "", "pixel_shuffle2_mlp2x_gelu", 4), ("siglip", "", "resampler", 8), ("siglip", "", "qformer", 8),
    ("clip", "dinov2", "mof_mlp", 32)])
def test_every_tower_and_connector_tiles_and_trains(tiny_llms, tiny_towers, tower, tower2, connector, per_view):
    model, tok, proc = tiny(tiny_llms, tiny_towers, 4, connector, tower, tiny_towers[tower2] if tower2 else "")
    assert model.num_image_tokens == per_view
    records = [{"id": "w", "image": ["w.png", "s.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "Two."}]}]
    folder = os.path.join(os.path.dirname(tiny_towers["siglip"]), f"imgs_{tower}_{connector}")
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (100, 30), (9, 9, 9)).save(os.path.join(folder, "w.png"))   # 1x4 grid: 5 views
    Image.new("RGB", (20, 20), (99, 9, 9)).save(os.path.join(folder, "s.png"))   # 1x1: the global view
    ds = VLMDataset(records, tok, proc, "llama", model.num_image_tokens, 512, folder, max_tiles=4)
    batch = collate([ds[0]], tok.pad_token_id)
    assert batch["image_grids"].tolist() == [[1, 4], [1, 1]] and batch["images"].shape[0] == 6
    slots = int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum())
    assert slots == (per_view * 5 + 2) + per_view
    out = model(**model_inputs(batch))
    out["loss"].backward()
    assert model.connector.image_newline.grad is not None and model.connector.image_newline.grad.abs().sum() > 0


def test_truncation_drops_whole_tiled_images(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = tiny(tiny_llms, tiny_towers, 4)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)   # 2x2: 16 * 5 + 3 = 83 tokens
    records = [{"id": "t", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "One."},
        {"from": "human", "value": "<image>\nSecond?"}, {"from": "gpt", "value": "Two."}]}]
    full = VLMDataset(records, tok, proc, "llama", model.num_image_tokens, 1000, str(tmp_path), max_tiles=4)[0]
    n = len(full["input_ids"])
    cut = VLMDataset(records, tok, proc, "llama", model.num_image_tokens, n - 20, str(tmp_path), max_tiles=4)[0]
    assert full["image_grids"].tolist() == [[2, 2], [2, 2]] and full["pixel_values"].shape[0] == 10
    assert cut["image_grids"].tolist() == [[2, 2]] and cut["pixel_values"].shape[0] == 5
    assert int((cut["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 83


def test_tiling_off_is_the_path_as_it_was(tiny_llms, tiny_towers, tmp_path):
    """max_tiles=0: no newline parameter, no new key in the saved files, one view per image, no grids, and the model's
    output is the tower -> connector -> splice of before, computed here by hand."""
    model, tok, proc = tiny(tiny_llms, tiny_towers, 0)
    assert not any("image_newline" in k for k in model.state_dict())
    save_pretrained(model, tok, proc, str(tmp_path / "m"), template="llama")
    for name in ("config.json", "processor_config.json"):
        assert "max_tiles" not in json.load(open(tmp_path / "m" / name)), name
    Image.new("RGB", (100, 30), (9, 120, 9)).save(tmp_path / "w.png")
    records = [{"id": "w", "image": "w.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Green."}]}]
    sample = VLMDataset(records, tok, proc, "llama", model.num_image_tokens, 512, str(tmp_path))[0]
    assert "image_grids" not in sample and sample["pixel_values"].shape == (3, *TILE)
    pixels = preprocess_image(Image.open(tmp_path / "w.png").convert("RGB"), proc)
    assert torch.equal(sample["pixel_values"], pixels)
    ids = encode(records[0]["conversations"], "llama", tok, PER_VIEW)["input_ids"]
    assert torch.equal(sample["input_ids"], ids)
    batch = collate([sample], tok.pad_token_id)
    assert batch["image_grids"] is None
    with torch.no_grad():
        logits = model(**{**model_inputs(batch), "labels": None})["logits"]
        emb = model.language_model.get_input_embeddings()(ids.clamp(min=0))
        emb[ids == IMAGE_TOKEN_INDEX] = model.connector(model.vision_tower(pixels[None]))[0]
        want = model.language_model(inputs_embeds=emb[None]).logits
    assert torch.allclose(logits, want, atol=1e-5)


def test_the_feature_cache_gives_the_tiled_loss_of_the_pixels(tiny_llms, tiny_towers, tmp_path):
    from model import FeatureCache
    model, tok, proc = tiny(tiny_llms, tiny_towers, 4)
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    Image.new("RGB", (100, 30), (9, 120, 9)).save(tmp_path / "w.png")
    Image.new("RGB", (30, 30), (120, 9, 9)).save(tmp_path / "s.png")
    records = [{"id": f"r{k}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]}
        for k, name in enumerate(["w.png", "s.png"])]
    ds = VLMDataset(records, tok, proc, "llama", model.num_image_tokens, 512, str(tmp_path), max_tiles=4)
    cache = FeatureCache(str(tmp_path / "cache"), model, proc)
    assert cache.fill(model, ["w.png", "s.png"], str(tmp_path)) == (2, 0)
    assert cache.load(str(tmp_path), "w.png")[1] == (1, 4)
    pixels = collate([ds[0], ds[1]], tok.pad_token_id)
    ds.feature_cache = cache
    cached = collate([ds[0], ds[1]], tok.pad_token_id)
    assert cached["images"] is None and torch.equal(cached["image_grids"], pixels["image_grids"])
    with torch.no_grad():
        a, b = model(**model_inputs(pixels))["loss"], model(**model_inputs(cached))["loss"]
    assert torch.allclose(a, b, atol=1e-6)
    untiled = FeatureCache(str(tmp_path / "cache"), tiny(tiny_llms, tiny_towers, 0)[0], proc)
    assert untiled.dir != cache.dir   # a cache of untiled features is never read as tiled ones


def untiled_then_tiled(tiny_llms, tiny_towers, tmp_path, finetune, *extra):
    """Two stages on 40x24 images (a 1x2 grid each): pretrain untiled (the connector), then finetune (`finetune`:
    its tune_llm and lr) with max_tiles=4, two steps each; the finetune's folder."""
    from conftest import write_dataset
    data, images = write_dataset(str(tmp_path / "d"), n=8, text_only=2)
    stages = [dict(name="pretrain", data="finetune", tune_llm="frozen", tune_connector="full", lr=1e-3, max_steps=2),
              dict(name="finetune", data="finetune", tune_connector="full", max_steps=2, max_tiles=4, **finetune)]
    out, _ = run_train(["--llm", tiny_llms["llama"], "--vision_tower", tiny_towers["siglip"], "--template", "llama",
                        "--data_finetune", data, "--images_finetune", images, "--stages", json.dumps(stages),
                        "--out_dir", tmp_path / "run", "--micro_batch_size", 4, "--global_batch_size", 4,
                        "--bf16", "false", "--threads", 1, "--num_workers", 0, "--check_data_at_start", "false",
                        *extra])
    return out


def test_a_later_stage_turns_tiling_on_and_the_folder_runs_in_transformers(tiny_llms, tiny_towers, tmp_path):
    """Pretrain untiled, finetune with max_tiles=4 (a fresh newline, trained): the final folder is tiled, loads back
    as ours and as a plain transformers model (remote code), which computes our logits on the same inputs."""
    out = untiled_then_tiled(tiny_llms, tiny_towers, tmp_path, dict(tune_llm="full", lr=1e-3))
    first = os.path.join(tmp_path, "run", "1_pretrain")
    assert "max_tiles" not in json.load(open(os.path.join(first, "config.json")))
    assert json.load(open(os.path.join(out, "config.json")))["max_tiles"] == 4
    model, tok, proc = load_pretrained(out)
    assert model.max_tiles == 4 and model.connector.image_newline.abs().sum() > 0
    from transformers import AutoModelForCausalLM, AutoProcessor
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hp = AutoProcessor.from_pretrained(out, trust_remote_code=True, backend="pil")
    pictures = [Image.new("RGB", (100, 30), (9, 120, 9)), Image.new("RGB", (7, 7), (200, 0, 0))]
    x = hp(images=pictures, text="USER: <image>\n<image>\nWhat colours? ASSISTANT:", return_tensors="pt")
    assert x["image_grids"].tolist() == [[1, 4], [1, 1]]
    views = torch.cat([preprocess_views(p, proc, "square", 4)[0] for p in pictures])
    assert torch.equal(x["pixel_values"], views)
    with torch.no_grad():
        ours = model(x["input_ids"], x["attention_mask"], images=views, image_grids=x["image_grids"])["logits"]
        theirs = hf(**x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert int((x["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == (16 * 5 + 2) + 16


def test_a_qlora_stage_that_turns_tiling_on_saves_its_trained_newline(tiny_llms, tiny_towers, tmp_path):
    """QLoRA merges onto the previous stage's full-precision folder, which is untiled here: the merged folder is tiled
    and holds the newline the stage trained (it was refused at the final save: an unexpected key)."""
    from safetensors.torch import load_file
    out = untiled_then_tiled(tiny_llms, tiny_towers, tmp_path, dict(tune_llm="qlora", lr=1e-2), "--lora_r", 4,
                             "--lora_alpha", 8)
    model, _, _ = load_pretrained(out)
    trained = load_file(os.path.join(out, "adapter_llm", "adapter_model.safetensors"))
    assert model.max_tiles == 4
    assert torch.equal(model.connector.image_newline, trained["base_model.model.connector.image_newline"])

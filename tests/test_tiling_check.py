"""The data check with tiling (issue #28): check_data.py (--config, --model, --tokenizer with --max-tiles) and
train.py's start-up check count each image's tokens from the grid its shape gets, report the tokens per image (p50,
p90, max, the grids), refuse a sample whose tiled images leave no room for text in max_length and count longer ones
as truncated; a later stage keeps the tiling of the model it starts from. The expected grids are worked out by hand
below (the grid rule of modeling_tinyllava_nano.choose_grid, on 32-px tiles), not by calling the code under test."""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import check_data
from conftest import IMAGE_SIZE, PATCH, run_train
from errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_VIEW = (IMAGE_SIZE // PATCH) ** 2   # SigLIP 32 px, patch 8: 16 tokens per view (mlp2x_gelu keeps them)
# image -> (width, height, the grid of at most 4 tiles of 32x32 that keeps the most of it, then pads the least)
SHAPES = {
    "wide.png": (100, 30, (1, 4)),    # 1x3 scales it to 96x28 (2688 of 3000 px); 1x4 keeps all 3000 (106x32)
    "tall.png": (30, 100, (4, 1)),    # the same turned
    "tiny.png": (3, 3, (1, 1)),       # 9 pixels whatever the grid: one tile pads the least
    "line.png": (1, 15000, (4, 1)),   # a sliver: the tallest grid keeps the most of it (1 x 128 px)
    "square.png": (64, 64, (2, 2)),   # fills a 2x2 canvas exactly
}


def tokens(grid):
    """An image's tokens, tiled: the global view and a newline, then each row of tiles and a newline (1x1: the global
    view alone, as untiled)."""
    rows, cols = grid
    return PER_VIEW if rows * cols == 1 else PER_VIEW * (1 + rows * cols) + rows + 1


COUNTS = {name: tokens(grid) for name, (_, _, grid) in SHAPES.items()}   # wide 82, tall 85, tiny 16, line 85, sq. 83


def conv(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def place(tiny_llms, tiny_towers, tmp_path_factory):
    """Images of odd shapes, a set of one-image records (one per shape), a set with a 4-image record over
    max_length=256 and a 2-image one longer than it (truncated, kept), configs and a saved tiled model."""
    from model import ModelArgs, build_model, save_pretrained
    root = tmp_path_factory.mktemp("tiling_check")
    images = root / "images"
    images.mkdir()
    for name, (w, h, _) in SHAPES.items():
        Image.new("RGB", (w, h), (200, 40, 40)).save(images / name)
    one = [{"id": name, "image": name, "conversations": conv("<image>\nWhat colour is it?", "Red.")} for name in SHAPES]
    (root / "one.json").write_text(json.dumps(one))
    several = [
        {"id": "four", "image": ["wide.png", "tall.png", "square.png", "line.png"],   # 82+85+83+85 = 335 >= 256
         "conversations": conv("<image> <image> <image> <image>\nSame colour?", "Yes.")},   # untiled: 64
        {"id": "two", "image": ["wide.png", "tall.png"],                    # 167 image tokens + a long answer > 256
         "conversations": conv("<image> <image>\nDescribe them.", " ".join(["red"] * 80) + ".")},
        {"id": "short", "image": ["tiny.png", "wide.png"],                  # 16 + 82: fits
         "conversations": conv("<image> <image>\nSame?", "Yes.")}]
    (root / "several.json").write_text(json.dumps(several))
    llm, tower = tiny_llms["llama"], tiny_towers["siglip"]
    common = (f"llm = {llm!r}\nvision_tower = {tower!r}\ntemplate = 'llama'\nimages_finetune = {str(images)!r}\n"
              "stages = [dict(name='finetune', data='finetune', tune_llm='full')]\n")
    (root / "tiled.py").write_text(common + f"data_finetune = {str(root / 'one.json')!r}\nmax_tiles = 4\n")
    (root / "several.py").write_text(common + f"data_finetune = {str(root / 'several.json')!r}\nmax_tiles = 4\n"
                                     "max_length = 256\n")
    model, tok, proc = build_model(ModelArgs(llm=llm, vision_tower=tower, max_tiles=4))
    save_pretrained(model, tok, proc, str(root / "model"), template="llama")
    (root / "model" / "train_config.json").write_text(json.dumps({"template": "llama", "max_length": 256}))
    # a later stage: max_tiles 0 keeps the tiling of the model it starts from (init_from), as training does
    (root / "later.py").write_text(f"init_from = {str(root / 'model')!r}\ntemplate = 'llama'\nimages_finetune = "
                                   f"{str(images)!r}\ndata_finetune = {str(root / 'one.json')!r}\n"
                                   "stages = [dict(name='finetune', data='finetune', tune_llm='full')]\n")
    return dict(root=root, images=str(images), one=str(root / "one.json"), several=str(root / "several.json"),
                tiled=str(root / "tiled.py"), several_cfg=str(root / "several.py"), model=str(root / "model"),
                later=str(root / "later.py"), llm=llm, tower=tower)


SEVERAL = [82, 85, 83, 85, 82, 85, 16, 82]   # every image read, in order (the bad record's too)


def expected_line(counts):
    v = sorted(counts)
    grids = {tokens(g): f"{g[0]}x{g[1]}" for _, _, g in SHAPES.values()}
    mix = ", ".join(f"{grids[n]} {v.count(n)}" for n in sorted(set(v)))
    return (f"tokens per image, tiled (max_tiles=4, {PER_VIEW} per view): p50 {v[len(v) // 2]}, "
            f"p90 {v[int(len(v) * 0.9)]}, max {v[-1]}; grids {mix}")


def test_check_data_counts_each_image_from_its_grid_with_config_model_and_tokenizer(place, capsys):
    assert sorted(COUNTS.values()) == [16, 82, 83, 85, 85]
    line = expected_line(COUNTS.values())
    assert line == "tokens per image, tiled (max_tiles=4, 16 per view): p50 83, p90 85, max 85; grids 1x1 1, 1x4 1, " \
                   "2x2 1, 4x1 2"
    base = [place["one"], "--image-folder", place["images"]]
    for how in (["--config", place["tiled"]], ["--config", place["later"]], ["--model", place["model"]],
                ["--tokenizer", place["llm"], "--template", "llama", "--num-image-tokens", str(PER_VIEW),
                 "--max-tiles", "4", "--tile-size", str(IMAGE_SIZE)]):
        assert check_data.main(base + how) == 0, how
        out = capsys.readouterr().out
        assert line in out.splitlines(), (how, out)
        assert "tokens per sample incl. the tokens of each image (llama template)" in out, out
    # the lengths: each sample's grows by its image's tiled count over the untiled 16, exactly
    from data import check, read_records
    from model import load_tokenizer
    records, tok = read_records(place["one"]), load_tokenizer(place["llm"])
    flat = check(records, place["images"], tok, "llama", PER_VIEW)
    tiled = check(records, place["images"], tok, "llama", PER_VIEW, max_tiles=4, tile=(IMAGE_SIZE, IMAGE_SIZE))
    assert tiled["image_tokens"] == [COUNTS[r["image"]] for r in records]
    assert [t - f for t, f in zip(tiled["lengths"], flat["lengths"])] == [COUNTS[r["image"]] - PER_VIEW
                                                                          for r in records]
    # untiled, as it was: no line per image, 16 per image
    assert check_data.main(base + ["--tokenizer", place["llm"], "--template", "llama", "--num-image-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "tokens per sample incl. 16 per image" in out and "tokens per image" not in out


def test_several_tiled_images_over_max_length_are_a_bad_record_and_a_longer_sample_is_truncated(place, capsys):
    assert check_data.main([place["several"], "--image-folder", place["images"], "--config",
                            place["several_cfg"]]) == 1
    out = capsys.readouterr().out
    assert (f"{place['several']}: record 0 (id='four'): 4 images (82+85+83+85 tokens, tiled) leave no room for text in "
            "max_length=256 [images-over-max-length]") in out, out
    assert "record 1" not in out and "record 2" not in out, out   # the long one is truncated, not bad
    assert re.search(r"      1  images-over-max-length\n", out), out
    assert re.search(r"tokens per sample incl\. the tokens of each image \(llama template\): .*; 1 longer than "
                     r"max_length 256 \(truncated\)", out), out
    # every image read is counted, the bad record's too
    assert expected_line(SEVERAL) in out.splitlines(), out
    # untiled: all three fit
    assert check_data.main([place["several"], "--image-folder", place["images"], "--tokenizer", place["llm"],
                            "--template", "llama", "--num-image-tokens", "16", "--max-length", "256"]) == 0
    capsys.readouterr()


def test_the_start_up_check_keeps_the_tiling_of_the_model_a_stage_starts_from(place, capsys):
    import recipes
    from stage_check import check_stages
    stage = dict(recipes.load_config(["--template=llama", "--max_length=256"]), stage="finetune", data="finetune",
                 data_finetune=place["several"], images_finetune=place["images"])
    assert stage["max_tiles"] == 0
    with pytest.raises(ConfigError, match=r"^stage finetune: .*several\.json: 1 of 3 records bad "
                                          r"\(images-over-max-length 1\), listed above"):
        check_stages([stage], place["model"])   # the tiled model: tiled
    out, err = capsys.readouterr()
    assert f"data check, stage finetune: {place['several']}: {expected_line(SEVERAL)}" in out, out
    assert "[images-over-max-length]" in err
    # a stage that turns tiling on, and the one after it with max_tiles 0, from llm and tower: both tiled
    first = dict(stage, stage="pretrain", data="pretrain", data_pretrain=place["several"],
                 images_pretrain=place["images"], max_tiles=4, llm=place["llm"], vision_tower=place["tower"])
    with pytest.raises(ConfigError) as e:
        check_stages([first, dict(first, stage="finetune", data="finetune", max_tiles=0)], "")
    assert [line.split(":")[0] for line in str(e.value).splitlines()] == ["stage pretrain", "stage finetune"]
    assert f"data check, stage pretrain: {place['several']}: tokens per image, tiled (max_tiles=4" in \
        capsys.readouterr().out
    # untiled from llm and tower: the three fit
    assert [n_bad for *_, n_bad, _ in check_stages([dict(first, max_tiles=0)], "")] == [0]
    out = capsys.readouterr().out
    assert "tokens per image" not in out


def test_train_refuses_several_tiled_images_over_max_length_before_training(place, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^stage finetune: .*several\.json: 1 of 3 records bad "
                                          r"\(images-over-max-length 1\), listed above; the run stops before "
                                          r"training"):
        run_train(["--config", place["several_cfg"], f"--out_dir={run}", "--max_tiles=4", "--bf16=false",
                   "--num_workers=0", "--threads=1", "--global_batch_size=2", "--micro_batch_size=2",
                   "--max_steps=1", "--peak_flops=1e10"])
    out, err = capsys.readouterr()
    assert "=== stage" not in out and not (run / "1_finetune.partial").exists()
    assert f"data check, stage finetune: {place['several']}: {expected_line(SEVERAL)}" in out, out
    assert "record 0 (id='four'): 4 images (82+85+83+85 tokens, tiled) leave no room" in err, err


def test_bad_max_tiles_and_tile_size_are_one_line_and_exit_2(place):
    """Checked before torch loads (a torch that cannot be imported is first on the path)."""
    notorch = place["root"] / "notorch" / "torch"
    notorch.mkdir(parents=True, exist_ok=True)
    (notorch / "__init__.py").write_text("raise ImportError('torch was imported before the values were checked')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(notorch.parent))
    cases = [("--max-tiles 65", "--max-tiles: expected a whole number from 0 to 64, got '65'"),
             ("--max-tiles -1", "--max-tiles"), ("--max-tiles x", "--max-tiles"), ("--max_tiles 1.5", "--max-tiles"),
             (f"--tokenizer {place['llm']} --num-image-tokens 16 --max-tiles 4", "--max-tiles: needs --tile-size"),
             ("--max-tiles 4 --tile-size 0", "--tile-size"), ("--tile-size 32", "--tile-size"),
             (f"--model {place['model']} --max-tiles 4 --tile-size 32", "--tile-size: only with --tokenizer")]

    def one(case):
        p = subprocess.run([sys.executable, "check_data.py", place["one"], *case[0].split()], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        return case, p
    with ThreadPoolExecutor(3) as pool:
        for (args, said), p in pool.map(one, cases):
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (args, p.stderr)
            assert lines[0].startswith("check_data.py: error: ") and said in lines[0], (args, lines)
    p = subprocess.run([sys.executable, "check_data.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "--max-tiles N" in p.stdout and "--tile-size PIXELS" in p.stdout

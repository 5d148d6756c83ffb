"""Bad data gets a clear answer: a deliberately broken data set with one record of each kind of problem. The
data check reports each (index and id), and the bad_samples="skip" policy leaves out exactly those records and
reports them, while "error" stops at the first."""
import json
import os

import pytest
from PIL import Image
from transformers import SiglipImageProcessor

import check_data
from data import DataError, VLMDataset, collate
from tiny_tokenizers import make_tokenizer

N_IMG = 4
Q = "What is in the picture?"


def turn(frm, value):
    return {"from": frm, "value": value}


def broken_dataset(root):
    """(path, image folder, {index: expected problem fragment}); records 0, 10 and 11 are fine, 7 only a note."""
    os.makedirs(f"{root}/images", exist_ok=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(f"{root}/images/ok.png")
    with open(f"{root}/images/corrupt.png", "wb") as f:
        f.write(b"\x89PNG not really")
    ok = [turn("human", f"<image>\n{Q}"), turn("gpt", "A cat.")]
    records = [
        {"id": "good", "image": "ok.png", "conversations": ok},
        {"id": "missing", "image": "nope.png", "conversations": ok},
        {"id": "corrupt", "image": "corrupt.png", "conversations": ok},
        {"id": "no-tag", "image": "ok.png", "conversations": [turn("human", Q), turn("gpt", "A cat.")]},
        {"id": "no-image", "conversations": ok},
        {"id": "two-tags", "image": "ok.png", "conversations": [turn("human", f"<image>\n<image>\n{Q}"),
                                                               turn("gpt", "A cat.")]},
        {"id": "not-alternating", "conversations": [turn("human", Q), turn("human", Q), turn("gpt", "A cat.")]},
        {"id": "system-first", "conversations": [turn("system", "Be brief."), turn("human", Q), turn("gpt", "Yes.")]},
        {"id": "gpt-first", "conversations": [turn("gpt", "Hi."), turn("gpt", "A cat.")]},
        {"id": "empty-turn", "conversations": [turn("human", Q), turn("gpt", "  ")]},
        {"id": "text", "conversations": [turn("human", Q), turn("gpt", "A cat.")]},
        {"id": "text2", "conversations": [turn("human", "Why?"), turn("gpt", "Because.")]},
        {"id": "too-long", "image": "ok.png", "conversations": [turn("human", "<image>\n" + " ".join([Q] * 40)),
                                                               turn("gpt", "A cat.")]},
    ]
    with open(f"{root}/data.json", "w") as f:
        json.dump(records, f)
    expected = {1: "cannot read image", 2: "cannot read image", 3: "no <image> in its text", 4: "but no 'image'",
                5: "2 <image> placeholders", 6: "turn 1 is from 'human', expected 'gpt'",
                8: "turn 1 is from 'gpt', expected 'human'", 9: "turn 1 (gpt) is empty",
                12: "answer truncated away at max_length=64"}
    return f"{root}/data.json", f"{root}/images", expected


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer("llama", tmp_path_factory.mktemp("tok"))


def test_the_check_reports_every_problem_with_index_and_id(tok, tmp_path, capsys):
    path, images, expected = broken_dataset(tmp_path)
    tok.save_pretrained(tmp_path / "tok")
    status = check_data.main([path, "--image-folder", images, "--tokenizer", str(tmp_path / "tok"),
                              "--template", "llama", "--num-image-tokens", str(N_IMG), "--max-length", "64"])
    out = capsys.readouterr().out
    assert status == 1
    ids = [r["id"] for r in json.load(open(path))]
    for i, fragment in expected.items():
        lines = [x for x in out.splitlines() if x.startswith(f"{path}: record {i} (id={ids[i]!r}): ")]
        assert lines and fragment in lines[0], (i, fragment, out)
    reported = {int(x.split("record ")[1].split(" ")[0]) for x in out.splitlines() if ": record " in x}
    assert reported == set(expected)
    assert "13 records (6 with an image, 7 text-only); 9 with problems; 1 notes" in out
    assert "tokens per sample incl. 4 per image (llama template): p50 " in out


def test_the_check_passes_a_clean_set(tok, tmp_path, capsys):
    path, images, expected = broken_dataset(tmp_path)
    records = [r for i, r in enumerate(json.load(open(path))) if i not in expected]
    report = check_data.check(records, images, tok, "llama", N_IMG, 64)
    assert report["problems"] == [] and len(report["lengths"]) == 4 and report["notes"][0][1] == "system-first"


def dataset(path, images, tok, policy):
    proc = SiglipImageProcessor(size={"height": 16, "width": 16})
    return VLMDataset(path, tok, proc, "llama", N_IMG, 64, images, bad_samples=policy)


def test_skip_policy_leaves_out_exactly_the_bad_records_and_reports_them(tok, tmp_path):
    path, images, expected = broken_dataset(tmp_path)
    with pytest.raises(DataError, match=r"data.json: record 3 \(id='no-tag'\): has 'image' but no <image>"):
        dataset(path, images, tok, "error")
    ds = dataset(path, images, tok, "skip")
    structural = {i for i, _, _ in ds.skipped}
    assert structural == {3, 4, 5, 6, 8, 9}            # found when the set is read
    batch = collate([ds[i] for i in range(len(ds))], tok.unk_token_id)
    at_read = {i for i, _, _ in batch["skipped"]}
    assert at_read == {1, 2, 12}                        # found when a sample is read: replaced, reported
    assert structural | at_read == set(expected)
    assert batch["input_ids"].shape[0] == len(ds) == 13 - 6
    # replacements keep the modality: every image row still has its picture
    assert batch["images"].shape[0] == int((batch["input_ids"] == -200).any(1).sum()) == 4


@pytest.mark.parametrize("tower,connector,extra", [("siglip", "mlp2x_gelu", {}), ("clip", "qformer", {}),
                                                   ("siglip", "pixel_shuffle2_mlp2x_gelu", {}), ("siglip", "linear", {"legacy_patch_drop": True}),
                                                   ("clip", "mof_mlp", {"vision_tower2": "dinov2"})])
def test_image_tokens_counted_from_configs_equal_the_built_model(tiny_llms, tiny_towers, tower, connector, extra):
    from model import ModelArgs, build_model, count_image_tokens
    if "vision_tower2" in extra:
        extra = {"vision_tower2": tiny_towers[extra["vision_tower2"]]}
    args = ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers[tower], connector=connector, num_queries=8,
                     **extra)
    assert count_image_tokens(args) == build_model(args)[0].num_image_tokens


def test_the_check_reads_a_training_config(tiny_llms, tiny_towers, tmp_path, capsys):
    path, images, expected = broken_dataset(tmp_path)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"llm = {tiny_llms['llama']!r}\nvision_tower = {tiny_towers['siglip']!r}\ntemplate = 'llama'\n"
                   f"max_length = 64\ndata_finetune = {path!r}\nimages_finetune = {images!r}\n")
    assert check_data.main([path, "--image-folder", images, "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert f"(stage finetune of {cfg})" in out and "incl. 16 per image (llama template)" in out
    assert "answer truncated away at max_length=64" in out

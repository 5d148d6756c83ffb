"""Which models evaluate.py runs and where: a transformers LlavaForConditionalGeneration folder (convert.py to-llava's
export) answers exactly as the model it came from, prompted by its processor's chat template; --dtype and --device
place the model; images are preprocessed by PIL as the original's processors did; a progress bar."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import convert
import evaluate
from model import ModelArgs, build_model, save_pretrained
from test_evaluate import dump, setup, write_benchmarks  # noqa: F401 (setup: the tiny model and benchmark fixtures)


@pytest.fixture(scope="module")
def exported(tiny_llms, tiny_towers, tmp_path_factory):
    """(ours, its to-llava export, data): a connector with some weight, so that the picture changes the answer."""
    root = tmp_path_factory.mktemp("export")
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    torch.manual_seed(0)
    for p in model.connector.parameters():
        p.data.normal_(0, 0.3)
    save_pretrained(model, tok, proc, str(root / "ours"))
    dump(str(root / "ours" / "train_config.json"), {"template": "llama"})
    convert.main(["to-llava", str(root / "ours"), str(root / "llava")])   # checks the logits too
    write_benchmarks(str(root / "data"))
    return str(root / "ours"), str(root / "llava"), str(root / "data")


def spy(monkeypatch):
    """evaluate.answer, recording the model each call got."""
    seen, real = [], evaluate.answer
    monkeypatch.setattr(evaluate, "answer", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    return seen


def test_a_llava_export_answers_as_the_model_it_came_from(exported, tmp_path, monkeypatch):
    ours, llava, data = exported
    args = ["--data", data, "--bench", "pope,scienceqa,custom", "--max-new-tokens", "6", "--batch-size", "2"]
    seen = spy(monkeypatch)
    mine = evaluate.main(["--model", ours, "--out", str(tmp_path / "ours"), *args])
    theirs = evaluate.main(["--model", llava, "--out", str(tmp_path / "llava"), *args])
    assert type(seen[-1]).__name__ == "LlavaForConditionalGeneration"
    texts = []
    for a, b in zip(mine, theirs):   # ScienceQA and custom mix text-only questions into the image batches
        rows = [[r["text"] for r in evaluate.read_json(str(tmp_path / who / f"{a['name']}_answers.jsonl"))]
                for who in ("ours", "llava")]
        assert rows[0] == rows[1] and a["metrics"] == b["metrics"], a["bench"]
        assert b["template"] == "processor chat template" and b["answer_settings"]["template"] == b["template"]
        texts += rows[0]
    assert len(set(texts)) > 2, "the answers should differ between questions"
    with pytest.raises(SystemExit):   # a transformers model has its own prompt
        evaluate.main(["--model", llava, "--out", str(tmp_path), *args, "--template", "llama"])


def test_dtype_and_device(setup, tmp_path, monkeypatch):
    model, data, _ = setup
    seen = spy(monkeypatch)
    base = ["--model", model, "--data", data, "--bench", "pope", "--max-new-tokens", "4"]
    auto = evaluate.main(base + ["--out", str(tmp_path / "auto")])[0]
    assert auto["answer_settings"]["dtype"] == "float32"   # on a CPU, auto is fp32
    cpu = evaluate.main(base + ["--out", str(tmp_path / "cpu"), "--device", "cpu"])[0]
    assert cpu["metrics"] == auto["metrics"] and cpu["answer_settings"] == auto["answer_settings"]
    half = evaluate.main(base + ["--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])[0]
    assert half["answer_settings"]["dtype"] == "bfloat16" and half["count"] == 6
    dtypes = [{p.dtype for p in m.parameters()} for m in seen]
    assert dtypes == [{torch.float32}, {torch.float32}, {torch.bfloat16}]
    assert {p.device.type for m in seen for p in m.parameters()} == {"cpu"}


def test_images_are_preprocessed_as_the_original_did(exported):
    """transformers 5 picks the torchvision image backend when torchvision is installed, PIL's otherwise; PIL's is
    what TinyLLaVA Factory's (transformers 4.40) processors computed: a bicubic PIL resize, x / 255 in float64 cast
    to float32, then (x - mean) / std. evaluate.py pins it for transformers models."""
    ours, llava, _ = exported
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    x = np.asarray(picture.resize((32, 32), Image.BICUBIC)).astype(np.float64) * (1 / 255)
    want = torch.from_numpy(((x.astype(np.float32) - np.float32(0.5)) / np.float32(0.5))).permute(2, 0, 1)
    args = dict(dtype="auto", device_map=None, trust_remote_code=False)
    _, _, processor, _ = evaluate.load_model(argparse.Namespace(model=llava, **args), True, torch.device("cpu"))
    assert processor.image_processor.backend == "pil"
    assert torch.equal(processor(images=picture, text="<image>", return_tensors="pt")["pixel_values"][0], want)
    _, _, ours_processor, _ = evaluate.load_model(argparse.Namespace(model=ours, **args), False, torch.device("cpu"))
    assert torch.equal(ours_processor(images=picture, return_tensors="pt")["pixel_values"][0], want)


def test_a_progress_bar_counts_questions(setup, tmp_path, monkeypatch):
    import tqdm
    bars = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kwargs, self.counted = kwargs, 0
            bars.append(self)

        def update(self, n=1):
            self.counted += n
            return super().update(n)
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    model, data, _ = setup
    evaluate.main(["--model", model, "--data", data, "--bench", "pope,mmmu", "--out", str(tmp_path),
                   "--max-new-tokens", "3", "--batch-size", "4"])
    assert [(b.kwargs["desc"], b.kwargs["total"], b.kwargs["unit"], b.counted) for b in bars] == [
        ("pope", 6, "q", 6), ("mmmu", 4, "q", 4)]   # MMMU's multi-image question is counted, not generated
    assert bars[0].kwargs["disable"] is None   # tqdm's rule: shown on a terminal (stderr), quiet otherwise
    evaluate.main(["--model", model, "--data", data, "--bench", "pope", "--out", str(tmp_path),
                   "--max-new-tokens", "3"])
    assert bars[-1].kwargs["total"] == 0   # all answered before: nothing left to count
    assert json.loads((tmp_path / "pope_results.json").read_text())["reused"] == 6

"""Every app that feeds images to a model, on a tiled one (issue #28: max_tiles, a global view + the tiles of a grid
chosen from the image's shape): the stage folder under plain transformers (Auto classes, pipeline), evaluate.py (ours
and its transformers path), visualize.py, the web demo and serve.py answer as chat.py answers, token for token; a
wide and a tall image (grids 1x4 and 3x1) and a small square one (1x1: the global view alone) in one conversation;
convert.py refuses the exports that cannot hold tiling, in one line, before the output folder is touched."""
import base64
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, pipeline

import chat
import evaluate
import serve
import visualize
import web_demo
from connectors import image_tokens
from model import ModelArgs, build_model, load_pretrained, save_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW, QUESTION = 6, "What is shown?"
SHAPES = {"wide": (100, 30), "tall": (40, 90), "square": (24, 24)}   # (width, height)
GRIDS = {"wide": (1, 4), "tall": (3, 1), "square": (1, 1)}           # choose_grid's, 32 px tiles, max_tiles=4


@pytest.fixture(scope="module")
def tiled(tiny_llms, tiny_towers, tmp_path_factory):
    """(stage folder, {name: image path}, (model, tokenizer, processor) loaded from the folder)."""
    root = tmp_path_factory.mktemp("tiled")
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"], max_tiles=4))
    torch.manual_seed(0)
    for p in model.connector.parameters():   # the image (its tiles, the newline) shapes the answer
        p.data.normal_(0, 0.3)
    for p in model.language_model.parameters():   # answers that depend on the prompt, not an early EOS
        if p.dim() == 2:
            p.data.normal_(0, 0.15)
    folder = str(root / "stage")
    save_pretrained(model, tok, proc, folder, template="llama")
    with open(os.path.join(folder, "train_config.json"), "w") as f:
        json.dump({"template": "llama"}, f)
    g, paths = torch.Generator().manual_seed(0), {}
    for name, (w, h) in SHAPES.items():
        paths[name] = str(root / f"{name}.png")
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(paths[name])
    return folder, paths, load_pretrained(folder)


def pictures(paths, *names):
    return [Image.open(paths[n]).convert("RGB") for n in names]


def chat_answer(folder, paths, *names, question=QUESTION):
    """chat.py's answer (its command line) about the images `names`, all with the question."""
    argv = ["--model", folder, "--prompt", question, "--max-new-tokens", str(NEW), "--no-stream"]
    return chat.main(argv + [x for n in names for x in ("--image", paths[n])])[-1]["value"]


def chat_tokens(parts, paths, *names, question=QUESTION):
    """The new token ids of chat.py's Chat for that conversation, with its prompt ids and inputs."""
    model, tok, proc = parts
    talk = chat.Chat(model, tok, proc, "llama", None, NEW, images=pictures(paths, *names))
    _, ids = talk.prompt_ids(question)
    pixels, grids = talk.inputs()
    new = model.generate(ids, torch.ones_like(ids), images=pixels, image_grids=grids, max_new_tokens=NEW,
                         do_sample=False)
    return new[0].tolist(), ids, pixels, grids


def test_chat_counts_each_image_by_its_grid(tiled):
    folder, paths, parts = tiled
    model, tok, _ = parts
    assert model.max_tiles == 4 and model.num_image_tokens == 16
    new, ids, pixels, grids = chat_tokens(parts, paths, "wide", "tall", "square")
    assert grids.tolist() == [list(GRIDS[n]) for n in ("wide", "tall", "square")]
    assert pixels.shape[0] == (1 + 4) + (1 + 3) + 1   # the global views and the tiles
    assert int((ids == -200).sum()) == sum(image_tokens(16, GRIDS[n]) for n in ("wide", "tall", "square"))
    answer = chat_answer(folder, paths, "wide", "tall", "square")
    assert answer and answer == tok.decode(new, skip_special_tokens=True).strip()


def test_transformers_auto_classes_answer_as_chat_py(tiled):
    """AutoModelForCausalLM + AutoProcessor (remote code, PIL image processor) on the folder: chat.py's ids, pixels,
    grids and answer tokens for a wide and a tall image."""
    folder, paths, parts = tiled
    new, ids, pixels, grids = chat_tokens(parts, paths, "wide", "tall")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")   # training's pixels
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    msgs = [{"role": "user", "content": [{"type": "image", "image": p} for p in pictures(paths, "wide", "tall")]
             + [{"type": "text", "text": QUESTION}]}]
    x = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    assert x["input_ids"].tolist() == ids.tolist() and x["image_grids"].tolist() == grids.tolist()
    assert torch.equal(x["pixel_values"], pixels)
    out = hf.generate(**x, max_new_tokens=NEW, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == new
    assert processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)[0].strip() == \
        chat_answer(folder, paths, "wide", "tall")


def test_pipeline_answers_as_chat_py(tiled):
    folder, paths, _ = tiled
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    for names in (("wide",), ("tall", "wide")):
        msgs = [{"role": "user", "content": [{"type": "image", "path": paths[n]} for n in names]
                 + [{"type": "text", "text": QUESTION}]}]
        reply = pipe(text=msgs, max_new_tokens=NEW)[0]["generated_text"][-1]["content"]
        assert reply.strip() == chat_answer(folder, paths, *names), names


QUESTIONS = [("w", ["wide.png"], "What is shown?"), ("t", ["tall.png"], "What colour is it?"),
             ("s", ["square.png"], "What is shown?"), ("text", [], "Why is the sky blue?"),
             ("two", ["tall.png", "wide.png"], "Are these the same?")]


def test_evaluate_answers_as_chat_py(tiled, tmp_path):
    """evaluate.py --bench custom, batches mixing grids, a text-only question and two images: chat.py's answers;
    its transformers path (the folder's AutoModel and processor) gives the same."""
    folder, paths, parts = tiled
    images = os.path.dirname(paths["wide"])
    with open(tmp_path / "q.jsonl", "w") as f:
        for qid, files, text in QUESTIONS:
            image = files[0] if len(files) == 1 else files or None
            f.write(json.dumps({"question_id": qid, "image": image, "text": text}) + "\n")
    with open(tmp_path / "refs.jsonl", "w") as f:
        f.writelines(json.dumps({"question_id": qid, "answer": "x"}) + "\n" for qid, _, _ in QUESTIONS)
    evaluate.main(["--model", folder, "--bench", "custom", "--questions", str(tmp_path / "q.jsonl"),
                   "--annotations", str(tmp_path / "refs.jsonl"), "--image-folder", images, "--out",
                   str(tmp_path / "out"), "--max-new-tokens", str(NEW), "--batch-size", "3", "--threads", "1"])
    (answers,) = [f for f in os.listdir(tmp_path / "out") if f.endswith("_answers.jsonl")]
    got = {r["question_id"]: r["text"] for r in evaluate.read_json(str(tmp_path / "out" / answers))}
    want = {qid: chat_answer(folder, paths, *[f[:-4] for f in files], question=text)
            for qid, files, text in QUESTIONS}
    assert got == want and len(set(want.values())) > 2

    model, tok, _ = parts   # the transformers path: our folder as transformers loads it, its processor
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    processor.tokenizer.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert not hasattr(hf, "num_image_tokens")   # answer() takes it as a transformers model
    items = evaluate.load_questions("custom", str(tmp_path / "q.jsonl"))
    rows = evaluate.answer(hf, processor.tokenizer, processor, items, images, "processor chat template",
                           str(tmp_path / "hf_answers.jsonl"), batch_size=3, max_new_tokens=NEW)
    assert {r["question_id"]: r["text"] for r in rows} == want


def test_convert_refuses_a_tiled_model_in_one_line(tiled, tmp_path):
    """As a user runs it (tests/test_imports.py: only the exports' tests import convert.py): exit 2, one line."""
    folder = tiled[0]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    for command in ("to-llava", "to-tinyllava"):
        dst = tmp_path / command
        dst.mkdir()   # an empty folder stays empty: refused before the output is claimed
        p = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), command, folder, str(dst)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in p.stderr.splitlines() if ": error: " in line]
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert lines[0].startswith(f"convert.py: error: {command}: a tiled model (max_tiles=4) cannot become ")
        assert os.listdir(dst) == []


def test_visualize_spans_follow_each_grid(tiled, tmp_path):
    folder, paths, parts = tiled
    model, tok, proc = parts
    names = ("wide", "tall", "square")
    answer, records = visualize.answer_and_trace(model, tok, proc, "llama", QUESTION, pictures(paths, *names),
                                                 max_new_tokens=NEW)
    assert answer == chat_answer(folder, paths, *names) and len(records) > 0
    for r in records:
        assert len(r["heat"]) == 3
        for name, heat in zip(names, r["heat"]):
            rows, cols = GRIDS[name]
            assert heat["grid"] == (rows, cols) and heat["global"].shape == (4, 4)   # 32 px / 8 px patches
            assert heat["views"].shape == (1 + rows * cols * (rows * cols > 1), 3, 32, 32)   # drawn on these
            if rows * cols == 1:
                assert heat["tiles"] is None
            else:
                assert heat["tiles"].shape == (4 * rows, 4 * cols)
        image = sum(float(h["global"].sum()) + (0 if h["tiles"] is None else float(h["tiles"].sum()))
                    for h in r["heat"])
        assert image + sum(w for _, _, w in r["text"]) <= 1 + 1e-4   # newlines are in neither
    blocks = visualize.image_blocks(model, list(range(sum(image_tokens(16, GRIDS[n]) for n in names))),
                                    torch.tensor([GRIDS[n] for n in names]))
    assert [len(b) for b, _, _ in blocks] == [image_tokens(16, GRIDS[n]) for n in names] == [16 * 5 + 2, 16 * 4 + 4, 16]
    with pytest.raises(ValueError, match="no heatmap drawn"):   # spans that do not add up are never drawn
        visualize.image_blocks(model, list(range(100)), torch.tensor([GRIDS["wide"]]))
    out = str(tmp_path / "vis.png")
    visualize.main(["--model", folder, "--image", paths["wide"], "--image", paths["square"], "--prompt", QUESTION,
                    "--max-new-tokens", "2", "--out", out])
    with Image.open(out) as im:   # wide: the global view + its tiles; square: the global view alone
        assert im.size[0] >= 3 * 160


def test_web_demo_and_serve_answer_as_chat_py(tiled, monkeypatch):
    """The web demo's conversation (two images, then one more in the second turn: chat.py's "/image") and its
    visualizer; serve.py's completion (its Engine, no HTTP), with an image as a data URL and as a path."""
    folder, paths, _ = tiled
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/image {paths['square']}\nAnd now?\n\n"))
    want = [t["value"] for t in chat.main(["--model", folder, "--image", paths["wide"], "--image", paths["tall"],
                                           "--max-new-tokens", str(NEW), "--no-stream"])[1::2]]
    engine, conv = web_demo.load_engine(folder), web_demo.Conversation()
    got = [list(conv.answer(engine, QUESTION, pictures(paths, "wide", "tall"), max_new_tokens=NEW))[-1],
           list(conv.answer(engine, "And now?", pictures(paths, "square"), max_new_tokens=NEW))[-1]]
    assert got == want
    assert len(conv.explain(engine)) == len(conv.last[1])
    records = visualize.trace(engine["model"], engine["tokenizer"], *conv.last)
    assert [h["grid"] for h in records[0]["heat"]] == [GRIDS["wide"], GRIDS["tall"], GRIDS["square"]]

    server = serve.Engine(folder)
    with open(paths["wide"], "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    for image in (url, paths["wide"]):
        body = {"max_tokens": NEW, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}]}]}
        assert server.complete(body)["choices"][0]["message"]["content"] == chat_answer(folder, paths, "wide")

"""chat.py driven as a user drives it (arguments, stdin, stdout, --save) with a tiny model; every answer checked
against model.generate on the prompt it should have been given."""
import json
import io
import os

import pytest
import torch
from PIL import Image

import chat
from data import encode, preprocess_image
from model import ModelArgs, build_model, save_pretrained


@pytest.fixture(scope="module")
def tiny_chat_model(tiny_llms, tiny_towers, tmp_path_factory):
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    torch.manual_seed(0)
    for p in model.connector.parameters():   # some weight on the image, so it shapes the answers
        p.data.normal_(0, 0.3)
    for p in model.language_model.parameters():   # larger than init, so answers depend on the prompt
        if p.dim() == 2:
            p.data.normal_(0, 0.15)
    d = tmp_path_factory.mktemp("chat")
    save_pretrained(model, tok, proc, str(d / "model"))
    with open(d / "model" / "train_config.json", "w") as f:
        json.dump({"template": "llama"}, f)
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (24, 40, 3), generator=g, dtype=torch.uint8).numpy()).save(d / "img.png")
    return str(d / "model"), str(d / "img.png"), (model.eval(), tok, proc)


def expected(parts, conversation, image_path, max_new_tokens=6):
    """model.generate's greedy answer to the conversation (ending in a question), decoded as chat.py decodes."""
    model, tok, proc = parts
    x = encode(conversation, "llama", tok, model.num_image_tokens, for_generation=True)["input_ids"][None]
    pixels = preprocess_image(Image.open(image_path).convert("RGB"), proc)[None]
    new = model.generate(x, torch.ones_like(x), images=pixels, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(new[0], skip_special_tokens=True).strip()


def test_one_question(tiny_chat_model, tmp_path, capsys):
    model_dir, image, parts = tiny_chat_model
    saved = str(tmp_path / "chat.json")
    history = chat.main(["--model", model_dir, "--image", image, "--prompt", "What is shown?",
                         "--max-new-tokens", "6", "--save", saved])
    want = expected(parts, [{"from": "human", "value": "<image>\nWhat is shown?"}], image)
    assert want and history[-1] == {"from": "gpt", "value": want}
    assert f"ASSISTANT: {want}" in capsys.readouterr().out       # streamed to stdout
    with open(saved) as f:
        assert json.load(f) == {"id": "chat", "image": image, "conversations": history}


def test_multi_turn_on_stdin_keeps_the_full_history(tiny_chat_model, tmp_path, monkeypatch, capsys):
    model_dir, image, parts = tiny_chat_model
    saved = str(tmp_path / "chat.json")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is shown?\nIs it sunny?\n\n"))
    chat.main(["--model", model_dir, "--image", image, "--max-new-tokens", "6", "--save", saved])
    out = capsys.readouterr().out
    with open(saved) as f:
        history = json.load(f)["conversations"]
    assert [t["from"] for t in history] == ["human", "gpt", "human", "gpt"]
    assert history[0]["value"] == "<image>\nWhat is shown?" and history[2]["value"] == "Is it sunny?"
    first = expected(parts, history[:1], image)
    assert first and history[1]["value"] == first                 # stored in full, not cut short
    assert history[3]["value"] == expected(parts, history[:3], image)   # asked after the whole first exchange
    cut = [history[0], {"from": "gpt", "value": first[:3]}, history[2]]
    assert history[3]["value"] != expected(parts, cut, image)     # (which this model can tell from a cut one)
    assert out.count("USER: ") == 3 and out.count("ASSISTANT: ") == 2   # the empty line ended the chat
    assert first in out and history[3]["value"] in out


def expected_many(parts, conversation, image_paths, max_new_tokens=6):
    model, tok, proc = parts
    x = encode(conversation, "llama", tok, model.num_image_tokens, for_generation=True)["input_ids"][None]
    pixels = torch.stack([preprocess_image(Image.open(p).convert("RGB"), proc) for p in image_paths])
    new = model.generate(x, torch.ones_like(x), images=pixels, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(new[0], skip_special_tokens=True).strip()


def test_several_images_and_an_image_in_a_later_turn(tiny_chat_model, tmp_path, monkeypatch):
    """Two --image go with the first question, in order; "/image PATH" on stdin adds one to the next question;
    every answer is model.generate's on all the pictures so far; --save writes the list."""
    model_dir, image, parts = tiny_chat_model
    other, third = str(tmp_path / "b.png"), str(tmp_path / "c.png")
    Image.new("RGB", (30, 30), (250, 10, 10)).save(other)
    Image.new("RGB", (30, 30), (10, 10, 250)).save(third)
    saved = str(tmp_path / "chat.json")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Same?\n/image {third}\nAnd now?\n/image {image}\n\n"))
    chat.main(["--model", model_dir, "--image", image, "--image", other, "--max-new-tokens", "6", "--save", saved])
    with open(saved) as f:
        record = json.load(f)
    history = record["conversations"]
    assert record["image"] == [image, other, third]   # the last /image was never asked about
    assert [t["value"] for t in history[::2]] == ["<image>\n<image>\nSame?", "<image>\nAnd now?"]
    assert history[1]["value"] == expected_many(parts, history[:1], [image, other])
    assert history[3]["value"] == expected_many(parts, history[:3], [image, other, third])
    assert expected_many(parts, history[:1], [image, other]) != expected_many(parts, history[:1], [other, image])


def test_sampling_is_seeded_and_not_greedy(tiny_chat_model, capsys):
    model_dir, image, parts = tiny_chat_model
    args = ["--model", model_dir, "--image", image, "--prompt", "What is shown?", "--max-new-tokens", "12",
            "--temperature", "1.5", "--top-p", "0.95", "--no-stream"]
    a = chat.main(args + ["--seed", "3"])[-1]["value"]
    assert chat.main(args + ["--seed", "3"])[-1]["value"] == a
    assert a != expected(parts, [{"from": "human", "value": "<image>\nWhat is shown?"}], image, 12)
    assert f"ASSISTANT: {a}\n" in capsys.readouterr().out            # --no-stream prints the whole answer


def test_template_must_be_known(tiny_chat_model, tmp_path):
    model_dir, image, _ = tiny_chat_model
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in os.listdir(model_dir):
        if name != "train_config.json":
            os.symlink(os.path.join(model_dir, name), bare / name)
    with pytest.raises(SystemExit):
        chat.main(["--model", str(bare), "--prompt", "Hi"])
    history = chat.main(["--model", str(bare), "--template", "llama", "--prompt", "Hi", "--max-new-tokens", "3"])
    assert history[0] == {"from": "human", "value": "Hi"}           # no image: no placeholder

"""visualize.py (issue 27): chat.py's answer, and per generated token a heatmap per image on the patch grid, the
top-k next-token probabilities (greedy: the first is the token itself) and the attention to earlier text, in a PNG."""
import pytest
import torch
from PIL import Image

import chat
import visualize
from model import load_pretrained
from test_chat import tiny_chat_model  # noqa: F401 (the fixture: chat.py's tiny model)


def test_pick_and_grid():
    assert visualize.pick("all", 4) == [0, 1, 2, 3]
    assert visualize.pick("-1", 4) == [3] and visualize.pick("0,2", 4) == [0, 2] and visualize.pick("-2:", 4) == [2, 3]
    with pytest.raises(ValueError):
        visualize.pick("7", 4)
    with pytest.raises(SystemExit):   # checked before torch loads: exit 2, one line naming the flag
        visualize.main(["--model", "m", "--prompt", "q", "--out", "x.png", "--layers", "a:b"])
    assert visualize.grid_of(16) == (4, 4, 0) and visualize.grid_of(17) == (4, 4, 1) and visualize.grid_of(6) == (1, 6, 0)


def test_cli_writes_the_png_of_chat_py_answer(tiny_chat_model, tmp_path, capsys):
    model_dir, image, _ = tiny_chat_model
    out = str(tmp_path / "vis.png")
    answer, records = visualize.main(["--model", model_dir, "--image", image, "--prompt", "What is shown?",
                                      "--max-new-tokens", "6", "--out", out, "--layers", "-1", "--top-k", "3"])
    want = chat.main(["--model", model_dir, "--image", image, "--prompt", "What is shown?", "--max-new-tokens", "6",
                      "--no-stream"])[-1]["value"]
    assert answer == want and f"ASSISTANT: {answer}" in capsys.readouterr().out
    assert len(records) == 6
    for r in records:
        (heat,) = r["heat"]
        assert heat.shape == (4, 4) and float(heat.min()) >= 0   # 32 px / 8 px patches
        assert len(r["top"]) == 3 and r["top"][0][0] == r["token"]   # greedy: the most probable token was chosen
        assert [p for _, p in r["top"]] == sorted((p for _, p in r["top"]), reverse=True)
        total = float(heat.sum()) + sum(w for _, _, w in r["text"])
        assert total <= 1 + 1e-4 and r["text"]   # rows of softmax weights: image + text <= 1 (the rest: answer)
    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_layers_and_heads_change_the_map_and_several_images(tiny_chat_model):
    model_dir, image, _ = tiny_chat_model
    model, tok, proc = load_pretrained(model_dir)
    pic = Image.open(image).convert("RGB")
    _, last = visualize.answer_and_trace(model.eval(), tok, proc, "llama", "What?", [pic], max_new_tokens=2,
                                         layers="-1", heads="0")
    _, first = visualize.answer_and_trace(model, tok, proc, "llama", "What?", [pic], max_new_tokens=2,
                                          layers="0", heads="1")
    assert not torch.allclose(last[0]["heat"][0], first[0]["heat"][0])
    _, two = visualize.answer_and_trace(model, tok, proc, "llama", "What?", [pic, pic.transpose(0)], max_new_tokens=2)
    assert len(two[0]["heat"]) == 2
    assert visualize.render(two, [pic, pic]).size[0] >= 2 * 160


def test_an_untiled_heatmap_is_drawn_over_the_pixels_the_tower_saw(tiny_chat_model):
    """CLIP keeps the middle of a wide picture: the heat goes over that crop (trace keeps each image's view), not
    over the whole picture squeezed into the square, where the patches would be misplaced."""
    from transformers import CLIPImageProcessor

    from images import preprocess_image
    pic = Image.new("RGB", (96, 32), "white")
    pic.paste((0, 0, 0), (32, 0, 64, 32))   # white | black | white: the crop is the black third
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    view = preprocess_image(pic, proc)[None]
    new, = visualize.drawings(pic, torch.zeros(4, 4), 48, view)
    old, = visualize.drawings(pic, torch.zeros(4, 4), 48)
    assert set(new.getdata()) == {(0, 0, 0)} and len(set(old.getdata())) > 1
    model_dir, image, _ = tiny_chat_model
    model, tok, proc = load_pretrained(model_dir)
    picture = Image.open(image).convert("RGB")
    _, records = visualize.answer_and_trace(model.eval(), tok, proc, "llama", "What?", [picture], max_new_tokens=1)
    assert torch.equal(records[0]["views"][0], preprocess_image(picture, proc, model.args.image_aspect_ratio)[None])

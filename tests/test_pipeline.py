"""A stage folder as a Hugging Face user runs it (issue 27): pipeline("image-text-to-text", model=folder,
trust_remote_code=True) in a subprocess started elsewhere, the repository off sys.path and offline, with the image as
a PIL image, a path and an http URL (a 127.0.0.1 server of this test), answers as chat.py answers, for every LLM
family of tests/conftest.py (Phi's biased head included) and MoF; our generate() raises no deprecation warning."""
import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

import chat
from conftest import LLMS
from model import ModelArgs, build_model, save_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION, NEW = "What is shown?", 8
CASES = {f: dict(family=f) for f in LLMS}
CASES["phi_mof"] = dict(family="phi", tower="clip", tower2="dinov2", connector="mof_mlp")

SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("always")
from PIL import Image
from transformers import pipeline
jobs, out = json.load(open(sys.argv[1])), {}
for name, job in jobs.items():
    pipe = pipeline("image-text-to-text", model=job["folder"], trust_remote_code=True)
    answers = {}
    for how in ("pil", "path", "url"):
        image = ({"image": Image.open(job["path"])} if how == "pil" else {"path": job["path"]} if how == "path"
                 else {"url": job["url"]})
        msgs = [{"role": "user", "content": [{"type": "image", **image}, {"type": "text", "text": job["question"]}]}]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reply = pipe(text=msgs, max_new_tokens=job["new"])[0]["generated_text"][-1]
        answers[how] = reply["content"]
        answers[how + "_warnings"] = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    out[name] = answers
print("RESULT" + json.dumps(out))
"""


def make_folder(tiny_llms, tiny_towers, root, family, tower="siglip", tower2="", connector="mlp2x_gelu"):
    args = ModelArgs(llm=tiny_llms[family], vision_tower=tiny_towers[tower], connector=connector,
                     vision_tower2=tiny_towers[tower2] if tower2 else "")
    model, tok, proc = build_model(args)
    torch.manual_seed(0)
    for p in model.connector.parameters():   # the image shapes the answer
        p.data.normal_(0, 0.3)
    for p in model.language_model.parameters():   # answers that depend on the prompt, not an early EOS
        if p.dim() == 2:
            p.data.normal_(0, 0.15)
    save_pretrained(model, tok, proc, root, template=LLMS[family][3])
    with open(os.path.join(root, "train_config.json"), "w") as f:
        json.dump({"template": LLMS[family][3]}, f)
    return root


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """(folder, base URL) of a 127.0.0.1 HTTP server that stops with the module."""
    folder = tmp_path_factory.mktemp("served")
    g = torch.Generator().manual_seed(1)
    Image.fromarray(torch.randint(0, 256, (24, 40, 3), generator=g, dtype=torch.uint8).numpy()).save(folder / "img.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield str(folder), f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_pipeline_answers_as_chat_py_for_every_family(tiny_llms, tiny_towers, tmp_path, image_server):
    folder, url = image_server
    image = os.path.join(folder, "img.png")
    jobs, want = {}, {}
    for name, case in CASES.items():
        d = make_folder(tiny_llms, tiny_towers, str(tmp_path / name), **case)
        jobs[name] = {"folder": d, "path": image, "url": f"{url}/img.png", "question": QUESTION, "new": NEW}
        history = chat.main(["--model", d, "--image", image, "--prompt", QUESTION, "--max-new-tokens", str(NEW),
                             "--no-stream"])
        want[name] = history[-1]["value"]
        assert want[name], name
    with open(tmp_path / "jobs.json", "w") as f:
        json.dump(jobs, f)
    with open(tmp_path / "run.py", "w") as f:
        f.write(SCRIPT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "jobs.json")], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.split("RESULT", 1)[1])
    for name in CASES:
        for how in ("pil", "path", "url"):
            assert got[name][how].strip() == want[name], (name, how, got[name][how], want[name])
            assert got[name][how + "_warnings"] == [], (name, how)
    assert "deprecat" not in done.stderr.lower(), done.stderr[-3000:]   # transformers' logger warnings too

"""Serving (issue 27, docs/serving.md): a `convert.py to-llava` export answers an OpenAI chat completion with a base64
image under `transformers serve` on 127.0.0.1 as chat.py answers, and carries the stage folder's decoding in its
generation_config.json."""
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from transformers import GenerationConfig

import chat
from test_pipeline import make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION, NEW = "What is shown?", 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion(port, model, image, question, max_tokens, timeout=120):
    """One OpenAI chat completion: the image as a base64 data URL."""
    with open(image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback, never a proxy
    with opener.open(req, timeout=timeout) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def wait_up(port, proc, path, seconds=180):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(seconds * 4):
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode})")
        try:
            with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def llava_export(tiny_llms, tiny_towers, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    src = make_folder(tiny_llms, tiny_towers, str(root / "stage"), "llama")
    dst = str(root / "llava")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "to-llava", src, dst], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return src, dst


def test_llava_export_decodes_as_the_stage_folder(llava_export):
    src, dst = llava_export
    ours, theirs = (GenerationConfig.from_pretrained(d).to_diff_dict() for d in (src, dst))
    theirs.pop("suppress_tokens", None)   # the <image> row Llava adds is never generated
    assert ours == theirs and ours["do_sample"] is False and ours["max_new_tokens"] == 128


def test_transformers_serve_runs_the_llava_export(llava_export, tmp_path):
    pytest.importorskip("openai", reason='transformers serve needs pip install "transformers[serving]"')
    src, dst = llava_export
    image = str(tmp_path / "img.png")
    from PIL import Image
    Image.new("RGB", (40, 24), (200, 40, 30)).save(image)
    want = chat.main(["--model", src, "--image", image, "--prompt", QUESTION, "--max-new-tokens", str(NEW),
                      "--no-stream"])[-1]["value"]
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = open(tmp_path / "serve.log", "w")   # a file: an unread pipe would fill and stop the server
    proc = subprocess.Popen([exe, "serve", dst, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_up(port, proc, "/health")
        assert completion(port, dst, image, QUESTION, NEW).strip() == want
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.parametrize("name", ["phi", "phi_mof"])
def test_serve_py_runs_what_llava_cannot_hold(name, tiny_llms, tiny_towers, tmp_path):
    """Phi's biased LM head and MoF have no Llava layout: serve.py runs the stage folder itself, same API."""
    import serve
    from test_pipeline import CASES
    folder = make_folder(tiny_llms, tiny_towers, str(tmp_path / name), **CASES[name])
    image = str(tmp_path / "img.png")
    from PIL import Image
    Image.new("RGB", (40, 24), (20, 140, 230)).save(image)
    want = chat.main(["--model", folder, "--image", image, "--prompt", QUESTION, "--max-new-tokens", str(NEW),
                      "--no-stream"])[-1]["value"]
    server = serve.start(serve.Engine(folder), "127.0.0.1", 0)
    try:
        assert completion(server.server_port, folder, image, QUESTION, NEW).strip() == want
        assert completion(server.server_port, folder, image, QUESTION, NEW).strip() == want   # no state kept
        if name == "phi":   # the other routes, and a bad request answered 400 with the server going on
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            base = f"http://127.0.0.1:{server.server_port}"
            with opener.open(base + "/v1/models", timeout=30) as r:
                assert json.load(r)["data"][0]["id"] == folder
            with opener.open(base + "/health", timeout=30) as r:
                assert json.load(r) == {"status": "ok"}
            for path, body in (("/v1/nothing", {}), ("/v1/chat/completions", {"messages": [{"role": "user",
                               "content": [{"type": "audio"}]}]}), ("/v1/chat/completions", {"stream": True})):
                req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
                with pytest.raises(urllib.error.HTTPError) as e:
                    opener.open(req, timeout=30)
                assert e.value.code in (400, 404)
            assert completion(server.server_port, folder, image, QUESTION, NEW).strip() == want
    finally:
        server.shutdown()
        server.server_close()

"""
A minimal OpenAI-compatible server for a stage folder, for what `transformers serve` cannot load (it runs only classes
transformers defines, so a Llava export: Phi's biased head, MoF and connectors other than mlp2x_gelu have no Llava
layout). Standard library only (http.server); the folder runs as transformers runs it (its processor and chat
template, the model's generate); binds 127.0.0.1 unless told otherwise. See docs/serving.md.

    python serve.py --model out/run/2_finetune --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" -d '{"messages": [{"role":
      "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
      {"type": "text", "text": "What is shown?"}]}], "max_tokens": 64}'

POST /v1/chat/completions (messages with text and image_url items: a data URL, an http(s) URL or a local path;
max_tokens, temperature, top_p, seed; no streaming), GET /v1/models, GET /health. One request generates at a time.
A tiled folder (max_tiles) needs nothing more: its processor gives image_grids with the views, and generate takes them.
"""
import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from settings import Int, Model, Parser


def to_hf(messages):
    """OpenAI chat messages -> transformers' (image_url items become {"type": "image", "url": ...})."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            items = []
            for c in content:
                if c.get("type") == "image_url":
                    url = c["image_url"]["url"] if isinstance(c["image_url"], dict) else c["image_url"]
                    items.append({"type": "image", "url": url})
                elif c.get("type") == "text":
                    items.append({"type": "text", "text": c["text"]})
                else:
                    raise ValueError(f"unsupported content type {c.get('type')!r}: text and image_url")
            content = items
        out.append({"role": m["role"], "content": content})
    return out


class Engine:
    """The stage folder as transformers loads it (our classes registered by `import model`: no remote code runs)."""

    def __init__(self, path, device="cpu"):
        import model  # noqa: F401 (registers tinyllava_nano with the Auto classes)
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor
        self.name, self.lock = path, threading.Lock()
        self.model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")   # training's pixels

    def complete(self, body):
        import torch
        if body.get("stream"):
            raise ValueError("stream is not supported by serve.py")
        inputs = self.processor.apply_chat_template(to_hf(body["messages"]), add_generation_prompt=True,
                                                    tokenize=True, return_dict=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        temperature = float(body.get("temperature") or 0)
        kwargs = {"do_sample": temperature > 0}
        if body.get("max_tokens") or body.get("max_completion_tokens"):
            kwargs["max_new_tokens"] = int(body.get("max_tokens") or body["max_completion_tokens"])
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(body.get("top_p") or 1.0))
        with self.lock:
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            out = self.model.generate(**inputs, **kwargs)
        n = inputs["input_ids"].shape[1]
        new = out[0, n:]
        text = self.processor.batch_decode([new], skip_special_tokens=True)[0].strip()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                 "finish_reason": "stop" if new.numel() and int(new[-1]) in eos
                                                 else "length"}],
                "usage": {"prompt_tokens": n, "completion_tokens": int(new.numel()), "total_tokens": n + new.numel()}}


def handler(engine):
    class Handler(BaseHTTPRequestHandler):
        def reply(self, code, payload):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self.reply(200, {"status": "ok"})
            if self.path == "/v1/models":
                return self.reply(200, {"object": "list", "data": [{"id": engine.name, "object": "model"}]})
            self.reply(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self.reply(404, {"error": {"message": f"no route {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.reply(200, engine.complete(body))
            except (ValueError, KeyError, TypeError, OSError) as e:   # a bad request or image: said, server goes on
                self.reply(400, {"error": {"message": f"{type(e).__name__}: {e}", "type": "invalid_request_error"}})

        def log_message(self, *args):
            pass
    return Handler


def start(engine, host="127.0.0.1", port=8000):
    """A running server (its own thread); .shutdown() stops it."""
    server = ThreadingHTTPServer((host, port), handler(engine))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv=None):
    p = Parser(prog="serve.py", description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Model(), help="a stage folder (or any folder model.py saved)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=Int(0, 65535), default=8000)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1")
    a = p.parse_args(argv)
    server = ThreadingHTTPServer((a.host, a.port), handler(Engine(a.model, a.device)))
    print(f"serving {a.model} on http://{a.host}:{server.server_port}/v1/chat/completions", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        sys.exit(2)

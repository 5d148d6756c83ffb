"""
A web page to chat with a trained model about one or several images (Gradio; `pip install -r requirements-extras.txt`).

    python web_demo.py                                   # the demo's model (out/demo/2_finetune), http://127.0.0.1:7860
    python web_demo.py --model out/run/2_finetune --port 8000
    python web_demo.py --model DIR --host 0.0.0.0        # reachable from other machines: only on a network you trust

Upload images with the first question (or a later one: they join the conversation there, in order), read the answer
as it is generated, ask again with the whole conversation before it, change temperature / top-p / max new tokens,
clear. "Where did it look?" draws, for each token of the last answer, visualize.py's panels: a heatmap over each
image of its attention (a tiled model's: its global view and its tiles, visualize.py), its top-k next-token
probabilities and its attention to the earlier text. Greedy answers (temperature 0) are chat.py's answers. The page
binds to 127.0.0.1 unless --host says otherwise.
"""
import argparse
import os
import sys
import threading

from settings import TEMPLATES, Choice, Int, Model, Parser

DEFAULT_MODEL = os.path.join("out", "demo", "2_finetune")


class Conversation:
    """One browser session's conversation: LLaVA turns, the pictures in reading order and the last answer's ids."""

    def __init__(self):
        self.turns, self.pictures, self.last = [], [], None

    def answer(self, engine, question, pictures=(), temperature=0.0, top_p=1.0, max_new_tokens=128):
        """Yields the answer as it grows; the last value is chat.py's decoding of it. The question's pictures join
        the conversation in this turn ("<image>\\n" before the text for each, as chat.py's first turn)."""
        import torch
        from transformers import TextIteratorStreamer
        from data import IMAGE_PLACEHOLDER, encode, image_inputs
        model, tokenizer = engine["model"], engine["tokenizer"]
        pictures = list(pictures)
        text = "\n".join([IMAGE_PLACEHOLDER] * len(pictures) + [question])
        turns = self.turns + [{"from": "human", "value": text}]
        every = self.pictures + pictures   # a tiled model's (max_tiles): views, grids and counts from each's shape
        images, grids, counts = image_inputs(every, engine["processor"], model.args.image_aspect_ratio,
                                             model.max_tiles, model.num_image_tokens)
        images, grids = (None if x is None else x.to(engine["device"]) for x in (images, grids))
        ids = encode(turns, engine["template"], tokenizer, counts, for_generation=True)["input_ids"]
        ids = ids[None].to(engine["device"])
        kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=float(temperature), top_p=float(top_p))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def run():
            try:
                result["new"] = model.generate(ids, torch.ones_like(ids), images=images, image_grids=grids,
                                               streamer=streamer, **kwargs)
            except Exception as e:   # noqa: BLE001 - shown on the page, the streamer released
                result["error"] = e
                streamer.end()
        with engine["lock"]:   # one generation at a time: the model is shared by every browser tab
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            partial = ""
            for piece in streamer:
                partial += piece
                yield partial.strip()
            worker.join()
        if "error" in result:
            raise result["error"]
        answer = tokenizer.decode(result["new"][0], skip_special_tokens=True).strip()
        self.turns = turns + [{"from": "gpt", "value": answer}]
        self.pictures, self.last = every, (ids, result["new"][0], images, grids)
        yield answer

    def explain(self, engine, layers="all", heads="all", top_k=5):
        """visualize.py's panels of the last answer, one picture per token."""
        import visualize
        if self.last is None:
            return []
        ids, new, images, grids = self.last
        records = visualize.trace(engine["model"], engine["tokenizer"], ids, new, images, grids, layers, heads,
                                  int(top_k))
        return [(visualize.panel(r, self.pictures), repr(r["token"])) for r in records]


def load_engine(path, template=None, device=None):
    import torch
    from folders import model_template
    from model import load_pretrained
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, processor = load_pretrained(path)
    return {"model": model.eval().to(device), "tokenizer": tokenizer, "processor": processor, "device": device,
            "template": model_template(path, model, template), "name": path, "lock": threading.Lock()}


def build_page(engine, max_new_tokens=128):
    """The Gradio page (gr.Blocks) on a loaded engine."""
    import gradio as gr
    from PIL import Image as PILImage

    def ask(message, chat_log, conversation, temperature, top_p, max_new_tokens):
        question = (message or {}).get("text", "").strip()
        files = (message or {}).get("files", [])
        if not question:
            yield chat_log, conversation, gr.update()
            return
        pictures = [PILImage.open(f if isinstance(f, str) else f["path"]).convert("RGB") for f in files]
        chat_log = list(chat_log) + [{"role": "user", "content": {"path": f if isinstance(f, str) else f["path"]}}
                                     for f in files]
        chat_log += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield chat_log, conversation, gr.update(value=None, interactive=False)
        try:
            for partial in conversation.answer(engine, question, pictures, temperature, top_p, max_new_tokens):
                chat_log[-1] = {"role": "assistant", "content": partial}
                yield chat_log, conversation, gr.update()
        except Exception as e:   # noqa: BLE001 - a bad image or setting: said on the page, the server goes on
            chat_log[-1] = {"role": "assistant", "content": f"(error: {e})"}
        yield chat_log, conversation, gr.update(value=None, interactive=True)

    with gr.Blocks(title="tinyllava-nano") as page:
        gr.Markdown(f"## tinyllava-nano\nModel: `{engine['name']}` (template `{engine['template']}`)",
                    elem_id="model-name")
        conversation = gr.State(Conversation)
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420, render_markdown=False)
        box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", elem_id="question",
                                   placeholder="Ask about the images (attach them with the clip)", show_label=False)
        with gr.Row():
            temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top-p")
            max_new = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="max new tokens")
        with gr.Row():
            clear = gr.Button("Clear", elem_id="clear")
            look = gr.Button("Where did it look? (last answer)", elem_id="look")
        with gr.Accordion("Visualizer settings", open=False):
            layers = gr.Textbox(value="all", label="layers (all, -1, 0,2, -4:)")
            heads = gr.Textbox(value="all", label="heads")
            top_k = gr.Slider(1, 20, value=5, step=1, label="top-k")
        gallery = gr.Gallery(label="per generated token", elem_id="visualizer", columns=4, height="auto")
        box.submit(ask, [box, chatbot, conversation, temperature, top_p, max_new], [chatbot, conversation, box])
        clear.click(lambda: ([], Conversation(), [], None), None, [chatbot, conversation, gallery, box])
        look.click(lambda c, la, he, k: c.explain(engine, la, he, k), [conversation, layers, heads, top_k], gallery)
    return page


def main(argv=None):
    p = Parser(prog="web_demo.py", description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, type=Model(), help=f"a model directory or Hub id (default: "
                   f"{DEFAULT_MODEL}, what `python demo.py` writes)")
    p.add_argument("--template", default=None, type=Choice(*TEMPLATES), help="chat template (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=Int(0, 65535), default=7860)
    a = p.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        p.error("needs Gradio: pip install -r requirements-extras.txt")
    page = build_page(load_engine(a.model, a.template))
    page.queue().launch(server_name=a.host, server_port=a.port)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:
        print(f"web_demo.py: error: {e}", file=sys.stderr)
        sys.exit(2)

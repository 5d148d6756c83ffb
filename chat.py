"""
Chat with a model about images: one answer, or a conversation read from stdin, streamed as it is generated.

    python chat.py --model out/demo/2_finetune --image demo/images/00002.png --prompt "What digit is shown?"
    python chat.py --model DIR --image cat.jpg                       # a question per line; empty line / EOF ends
    python chat.py --model DIR --image cat.jpg --temperature 0.2 --top-p 0.9 --max-new-tokens 256 --seed 1
    python chat.py --model DIR --image cat.jpg --save chat.json      # the conversation as a LLaVA-format record
    python chat.py --model path/to/TinyLLaVA-Phi-2-SigLIP-3.1B --image cat.jpg   # an original checkpoint, offline
    python chat.py --model DIR --image a.png --image b.png --prompt "Are these the same digit?"   # several images
    # on stdin, a line "/image PATH" adds a picture to the next question (images in later turns)

The images of --image go with the first question, each as an <image> placeholder in order; "/image PATH" adds one
to the next question. Every question is asked with the whole conversation before it (and every image so far), each
earlier answer in full (TinyLLaVA Factory's CLI stores its answers cut short). Decoding is greedy unless --temperature > 0,
which samples (with --top-p nucleus filtering when given). The chat template is --template, else the one in
<model>/train_config.json, else the one a TinyLLaVA Factory checkpoint implies (see convert.py). Images are
preprocessed as the model was trained (its image_aspect_ratio; a tiled model's, max_tiles, as a global view and
the tiles of a grid chosen from the image's shape). Runs on the GPU when there is one (bf16), else CPU fp32.
"""
import argparse
import json
import os
import sys
import tempfile

from settings import DTYPES, SEED_MAX, TEMPLATES, Choice, Device, Float, Image, Int, Model, Output, Parser


def streamer(tokenizer):
    """transformers' TextStreamer (prints words as they complete) without the space an answer's first token carries."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.started = False

        def on_finalized_text(self, text, stream_end=False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)
    return Streamer()


class Chat:
    """A conversation about images (or none). ask() answers a question and keeps both in .history, which is
    in LLaVA's format: [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...].
    `image` (one) or `images` (several) go with the first question; add_image() adds one to the next question."""

    def __init__(self, model, tokenizer, processor, template, image=None, max_new_tokens=512, temperature=0.0,
                 top_p=None, images=()):
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.device, self.processor = next(model.parameters()).device, processor
        self.images, self.pending = [], []   # (pixels, grid, tokens) of every picture asked about; of the next question
        for im in ([image] if image is not None else []) + list(images):
            self.add_image(im)
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            self.generate_kwargs.update(temperature=temperature, **({"top_p": top_p} if top_p else {}))
        self.history = []

    def add_image(self, image):
        """A PIL image for the next question (its <image> placeholders lead the question, in the order added);
        a tiled model's (max_tiles) as its global view and tiles, with its grid and token count."""
        from data import image_inputs
        m = self.model
        pixels, grid, count = image_inputs([image], self.processor, m.args.image_aspect_ratio, m.max_tiles,
                                           m.num_image_tokens)
        self.pending.append((pixels.to(self.device), grid, count[0]))

    def prompt_ids(self, question):
        """The prompt for `question` after the conversation so far (the pending images at its front)."""
        from data import IMAGE_PLACEHOLDER, encode
        turn = {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n" * len(self.pending) + question}
        counts = [n for _, _, n in self.images + self.pending]   # each image's tokens (untiled: num_image_tokens)
        ids = encode(self.history + [turn], self.template, self.tokenizer, counts, for_generation=True)["input_ids"]
        return turn, ids[None].to(self.device)

    def inputs(self):
        """generate's images and image_grids for every picture so far and the pending ones (None without)."""
        import torch
        every = self.images + self.pending
        pixels = torch.cat([p for p, _, _ in every]) if every else None
        grids = torch.cat([g for _, g, _ in every]).to(self.device) if every and self.model.max_tiles else None
        return pixels, grids

    def ask(self, question, streamer=None):
        import torch
        turn, ids = self.prompt_ids(question)
        # every prompt holds the image tokens of every turn so far, so every turn passes all the pictures
        pixels, grids = self.inputs()
        new = self.model.generate(ids, torch.ones_like(ids), images=pixels, image_grids=grids, streamer=streamer,
                                  **self.generate_kwargs)
        self.images, self.pending = self.images + self.pending, []
        answer = self.tokenizer.decode(new[0], skip_special_tokens=True).strip()
        self.history += [turn, {"from": "gpt", "value": answer}]
        return answer


def questions(prompt):
    """The one --prompt, or lines from stdin until an empty line, "exit" or EOF."""
    if prompt is not None:
        yield prompt
        return
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            print()
            return
        if line in ("", "exit", "quit"):
            return
        yield line


def main(argv=None):
    p = Parser(prog="chat.py", description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Model(), help="a model directory (ours, or a TinyLLaVA Factory "
                   "checkpoint), or a Hub id")
    p.add_argument("--image", action="append", default=[], type=Image(), help="a picture to talk about (optional; "
                   "repeat it for several, in order)")
    p.add_argument("--prompt", default=None, help="ask this one question and exit (default: read stdin)")
    p.add_argument("--template", default=None, type=Choice(*TEMPLATES), help="chat template (default: the model's own)")
    p.add_argument("--temperature", type=Float(0), default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=Float(above=0, high=1), default=None, help="nucleus sampling threshold (with "
                   "--temperature > 0)")
    p.add_argument("--max-new-tokens", type=Int(1), default=512)
    p.add_argument("--seed", type=Int(0, SEED_MAX), default=0)
    p.add_argument("--no-stream", action="store_true", help="print each answer when it is complete")
    p.add_argument("--save", default=None, type=Output(folder=False), help="write the conversation to this JSON file "
                   "(LLaVA format; if that fails, to a file in the temporary folder, named in the error)")
    p.add_argument("--device", default=None, type=Device(), help="cuda, cuda:1, mps, cpu (default: the first of these "
                   "this machine has)")
    p.add_argument("--dtype", default="auto", type=Choice("auto", *DTYPES),
                   help="auto (default): bfloat16 on a GPU with bf16, else float32 (as evaluate.py)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the LLM's own code (OpenELM); off: no code from the model folder or the Hub runs")
    a = p.parse_args(argv)   # --help and every value checked here, before torch and transformers load (seconds)
    import torch
    from transformers.utils import logging as hf_logging
    from folders import model_template
    from model import load_pretrained   # ours, and the original's layouts (layouts.py)
    from data import load_image
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if Device.missing(a.device):
        p.error(Device.missing(a.device))
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    dtype = a.dtype if a.dtype != "auto" else "bfloat16" if a.device.startswith("cuda") and \
        torch.cuda.is_bf16_supported() else "float32"
    model, tokenizer, processor = load_pretrained(a.model, dtype=dtype, trust_remote_code=a.trust_remote_code)
    try:
        template = model_template(a.model, model, a.template)
    except ValueError as e:   # no template given, none saved with the model
        p.error(str(e))
    torch.manual_seed(a.seed)
    chat = Chat(model.to(a.device), tokenizer, processor, template, None, a.max_new_tokens, a.temperature, a.top_p,
                images=[load_image(path) for path in a.image])
    paths = list(a.image)
    for question in questions(a.prompt):
        if question.startswith("/image "):   # a picture for the next question
            try:
                chat.add_image(load_image(question[len("/image "):].strip()))
                paths.append(question[len("/image "):].strip())
            except (OSError, ValueError) as e:
                print(f"chat.py: {e}", flush=True)
            continue
        print("ASSISTANT: ", end="", flush=True)
        answer = chat.ask(question, None if a.no_stream else streamer(tokenizer))
        if a.no_stream:
            print(answer, flush=True)
    if a.save:
        paths = paths[:len(chat.images)]   # those asked about
        image = {"image": paths if len(paths) > 1 else paths[0]} if paths else {}
        save(a.save, {"id": "chat", **image, "conversations": chat.history})
    return chat.history


def save(path, record):
    """The conversation as JSON in `path`; if that fails (a full disk), in a file of the temporary folder (else on
    stdout), named in the one-line error: a failed save never loses the conversation."""
    text = json.dumps(record, indent=1, ensure_ascii=False)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        try:
            fd, kept = tempfile.mkstemp(prefix="chat-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            kept = f"in {kept}"
        except OSError:
            print(text, flush=True)
            kept = "printed above"
        raise OSError(f"--save: cannot write {path} ({e.strerror or e}); the conversation is {kept}") from None


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:   # a model folder that cannot be read or loaded, an image that cannot be read
        print(f"chat.py: error: {e}", file=sys.stderr)
        sys.exit(2)

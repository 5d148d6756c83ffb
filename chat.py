"""
Chat with a model about one image: one answer, or a conversation read from stdin, streamed as it is generated.

    python chat.py --model out/demo/2_finetune --image demo/images/0.png --prompt "What digit is this?"
    python chat.py --model DIR --image cat.jpg                       # a question per line; empty line / EOF ends
    python chat.py --model DIR --image cat.jpg --temperature 0.2 --top-p 0.9 --max-new-tokens 256 --seed 1
    python chat.py --model DIR --image cat.jpg --save chat.json      # the conversation as a LLaVA-format record
    python chat.py --model path/to/TinyLLaVA-Phi-2-SigLIP-3.1B --image cat.jpg   # an original checkpoint, offline

The image goes with the first question; every question is asked with the whole conversation before it, each earlier
answer in full (TinyLLaVA Factory's CLI stores its answers cut short). Decoding is greedy unless --temperature > 0,
which samples (with --top-p nucleus filtering when given). The chat template is --template, else the one in
<model>/train_config.json, else the one a TinyLLaVA Factory checkpoint implies (see convert.py). Images are
preprocessed as the model was trained (its image_aspect_ratio). Runs on the GPU when there is one (bf16), else CPU fp32.
"""
import argparse
import json
import sys


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
    """A conversation about one image (or none). ask() answers a question and keeps both in .history, which is
    in LLaVA's format: [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]."""

    def __init__(self, model, tokenizer, processor, template, image=None, max_new_tokens=512, temperature=0.0,
                 top_p=None):
        from data import preprocess_image
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.device = next(model.parameters()).device
        self.pixels = None
        if image is not None:
            self.pixels = preprocess_image(image, processor, model.args.image_aspect_ratio)[None].to(self.device)
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            self.generate_kwargs.update(temperature=temperature, **({"top_p": top_p} if top_p else {}))
        self.history = []

    def prompt_ids(self, question):
        """The prompt for `question` after the conversation so far (the image in its first question)."""
        from data import IMAGE_PLACEHOLDER, encode
        first = not self.history and self.pixels is not None
        turn = {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}" if first else question}
        ids = encode(self.history + [turn], self.template, self.tokenizer, self.model.num_image_tokens,
                     for_generation=True)["input_ids"][None]
        return turn, ids.to(self.device)

    def ask(self, question, streamer=None):
        import torch
        turn, ids = self.prompt_ids(question)
        # every prompt holds the first turn's image tokens, so every turn passes the picture
        new = self.model.generate(ids, torch.ones_like(ids), images=self.pixels, streamer=streamer,
                                  **self.generate_kwargs)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (ours, or a TinyLLaVA Factory checkpoint)")
    p.add_argument("--image", default=None, help="the picture to talk about (optional)")
    p.add_argument("--prompt", default=None, help="ask this one question and exit (default: read stdin)")
    p.add_argument("--template", default=None, help="chat template (default: the model's own)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", action="store_true", help="print each answer when it is complete")
    p.add_argument("--save", default=None, help="write the conversation to this JSON file (LLaVA format)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: the first of these this machine has)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on a GPU with bf16, else float32 (as evaluate.py)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the LLM's own code (OpenELM); off: no code from the model folder or the Hub runs")
    a = p.parse_args(argv)   # --help ends here, before torch and transformers load (seconds)
    import torch
    from transformers.utils import logging as hf_logging
    from folders import model_template
    from model import load_pretrained   # ours, and the original's layouts (layouts.py)
    from data import load_image
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    dtype = a.dtype if a.dtype != "auto" else "bfloat16" if a.device.startswith("cuda") and \
        torch.cuda.is_bf16_supported() else "float32"
    model, tokenizer, processor = load_pretrained(a.model, dtype=dtype, trust_remote_code=a.trust_remote_code)
    template = model_template(a.model, model, a.template)   # a ValueError: one line (below)
    torch.manual_seed(a.seed)
    chat = Chat(model.to(a.device), tokenizer, processor, template, load_image(a.image) if a.image else None,
                a.max_new_tokens, a.temperature, a.top_p)
    for question in questions(a.prompt):
        print("ASSISTANT: ", end="", flush=True)
        answer = chat.ask(question, None if a.no_stream else streamer(tokenizer))
        if a.no_stream:
            print(answer, flush=True)
    if a.save:
        with open(a.save, "w") as f:
            json.dump({"id": "chat", **({"image": a.image} if a.image else {}), "conversations": chat.history},
                      f, indent=1, ensure_ascii=False)
    return chat.history


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:   # a model folder that cannot be read or loaded, an image that cannot be read
        print(f"chat.py: error: {e}", file=sys.stderr)
        sys.exit(2)

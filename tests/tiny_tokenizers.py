"""Tiny, offline tokenizers in the style of each LLM family TinyLLaVA supports.

    tok = make_tokenizer("llama", tmp_path / "tok")   # phi | stablelm | llama | gemma | qwen2 | qwen2_base

Each one is a real BPE trained (deterministically) on the small corpus below with the `tokenizers` library,
using the pre-tokenizer / byte handling / special tokens of the family, wrapped in the transformers class the
real checkpoint names, saved with `save_pretrained` and reloaded through `AutoTokenizer.from_pretrained(dir)`.
The reload matters: transformers 5 rebuilds the normalizer / pre-tokenizer from the class named in
tokenizer_config.json (e.g. LlamaTokenizer picks Metaspace prepend_scheme "first" from legacy=False), so the
tokenizer under test is assembled exactly like one loaded from a Hub checkpoint. No network is used.
"""

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoTokenizer, CodeGenTokenizer, GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerBase,
                          Qwen2Tokenizer)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

# Words the tests use (system prompt, roles, questions, answers, captions), some digits, punctuation and newlines.
# "USER" only ever follows "</s>" here, so the llama-style vocab learns "USER" but not "▁USER", like Llama-2's
# vocab: a round tokenized on its own ("▁" + "USER") is then one token longer than inside the conversation,
# which is exactly what LLaVA's `legacy=False` round_len/instruction_len adjustment assumes.
_DIALOGUE = [
    ("What is shown in the image?", "A cat."),
    ("What is shown?", "A cat sitting on a red mat."),
    ("What color is the dog?", "The dog is brown and white."),
    ("Describe the picture in detail.", "Two people are walking a dog in the park near a lake."),
    ("How many cats are there?", "There are 3 cats on the sofa, and 12 birds in the tree."),
    ("Is it sunny?", "Yes, it is a sunny day with a few white clouds."),
    ("Why is the sky blue?", "Because air scatters blue light more than red light."),
    ("Tell me a short story about a robot.", "Once upon a time, a small robot learned to paint."),
]
CORPUS = [SYSTEM] * 3 + [f"Hi.</s>USER: {q} ASSISTANT: {a}</s>" for q, a in _DIALOGUE] + [
    "Answer the question using a single word or phrase.",
    "A photo of a cat on a mat. A dog running on the beach. A red car parked in the street.",
    "The quick brown fox jumps over the lazy dog. Hello world! What is this? It's a test.",
    "Render a clear and concise summary of the photo.\nA small boat on a calm lake at sunset.",
    "user assistant system: you are a helpful assistant.\n\nquestion answer image picture photo\n",
    "What are these? They are apples, oranges and bananas on a wooden table (fruit).",
    "Please answer yes or no. Is there a person in the image? No. Yes. 2024 100 7",
    "Symbols: <tag> a < b > c | d_e [x] {y} 50% $5 #1 @home & more; done - ok * / \\\\ = + ~ ` ^",
]

STYLES = ("phi", "stablelm", "llama", "gemma", "qwen2", "qwen2_base")

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-Instruct style ChatML template (default system message when none is given).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# SentencePiece (split_by_whitespace / split_by_unicode_script) never merges across a space or a letter/symbol
# boundary; transformers' Llama/Gemma classes tokenize without splitting, so the training pre-tokenizer is what
# keeps learned pieces word-like.
_ISOLATE_PUNCT = pre_tokenizers.Split(Regex(r"[^\w▁]"), behavior="isolated")


def _train_bpe(tok: Tokenizer, vocab_size: int, **trainer_kw) -> tuple[dict, list]:
    """Train `tok` (model = empty BPE) on CORPUS and return (vocab, merges) read back from its JSON."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kw)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _byte_level_bpe(pre_tokenizer, vocab_size: int = 700) -> tuple[dict, list]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return _train_bpe(tok, vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def _sentencepiece_like_bpe(first_ids: list[str], tok: Tokenizer, vocab_size: int = 500) -> tuple[dict, list]:
    """SentencePiece-converted vocab layout: special tokens first, then the 256 byte-fallback pieces <0x00>..<0xFF>,
    then the learned pieces (as in Llama / Gemma)."""
    learned, merges = _train_bpe(tok, vocab_size)
    vocab = {t: i for i, t in enumerate(first_ids + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def _append(vocab: dict, *tokens: str) -> dict:
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


def make_tokenizer(style: str, out_dir) -> PreTrainedTokenizerBase:
    """Build the `style` tokenizer, save it to `out_dir` and return `AutoTokenizer.from_pretrained(out_dir)`."""
    out_dir = Path(out_dir)
    if style in ("phi", "stablelm"):
        # microsoft/phi-2: CodeGenTokenizer (GPT-2 byte-level BPE), bos = eos = unk = <|endoftext|>, no BOS added.
        vocab, merges = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
        tok = CodeGenTokenizer(vocab=_append(vocab, "<|endoftext|>"), merges=merges)
    elif style == "llama":
        # TinyLlama-1.1B-Chat: <unk>=0 <s>=1 </s>=2, byte fallback, "▁" prefix on the first piece only
        # (legacy=False), BOS added.
        pre = Tokenizer(models.BPE(byte_fallback=True))
        pre.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True), _ISOLATE_PUNCT]
        )
        vocab, merges = _sentencepiece_like_bpe(["<unk>", "<s>", "</s>"], pre)
        tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, add_eos_token=False)
    elif style == "gemma":
        # gemma-2b-it: <pad>=0 <eos>=1 <bos>=2 <unk>=3, spaces -> "▁" without a dummy prefix, BOS added.
        pre = Tokenizer(models.BPE(byte_fallback=True))
        pre.normalizer = normalizers.Replace(" ", "▁")
        pre.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("▁", behavior="merged_with_next"), _ISOLATE_PUNCT]
        )
        vocab, merges = _sentencepiece_like_bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], pre)
        tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    elif style in ("qwen2", "qwen2_base"):
        # Qwen2(-Instruct): byte-level BPE with the Qwen2 split regex, no BOS, pad = <|endoftext|>;
        # eos = <|im_end|> for the instruct model, <|endoftext|> for the base model.
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        vocab, merges = _byte_level_bpe(pre)
        _append(vocab, "<|endoftext|>", "<|im_start|>", "<|im_end|>")
        eos = "<|im_end|>" if style == "qwen2" else "<|endoftext|>"
        tok = Qwen2Tokenizer(
            vocab=vocab, merges=merges, eos_token=eos, pad_token="<|endoftext|>",
            extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        tok.chat_template = QWEN2_CHAT_TEMPLATE
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; valid: {', '.join(STYLES)}")
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)

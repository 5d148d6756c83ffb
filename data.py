"""Data: LLaVA-format records -> chat text -> token ids with labels -> padded batches.

    records = load_records("llava_v1_5_mix665k.json")          # JSON list or JSONL, validated up front
    ds = VLMDataset(records, tokenizer, image_processor, template="phi", num_image_tokens=728,
                    max_length=3072, image_folder="data/images", image_aspect_ratio="square")
    loader = DataLoader(ds, batch_size=8, collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
    batch = next(iter(loader))   # input_ids, attention_mask, labels [B, L]; images [n_img, 3, H, W] or None
    # one prompt for generation (ends in "ASSISTANT:", labels all IGNORE_INDEX)
    x = encode([{"from": "human", "value": "<image>\\nWhat is this?"}], "phi", tokenizer, 728, for_generation=True)

Public API (each docstring gives the details)
    IGNORE_INDEX = -100, IMAGE_TOKEN_INDEX = -200, IMAGE_PLACEHOLDER = "<image>", DataError(ValueError).code
    read_records(path) -> records, parsed;  load_records(path) -> records, parsed and checked (records.py: the
        record checks, re-exported here with DataError, BadLine, IMAGE_PLACEHOLDER)
    TEMPLATES: name -> ChatTemplate | HFChatTemplate;  get_template;  render -> (text, supervised character spans)
    encode(conversations, template, tokenizer, num_image_tokens, max_length=None, for_generation=False)
        -> {"input_ids": LongTensor[T], "labels": LongTensor[T]}
    load_image, preprocess_image, preprocess_views, image_inputs: images.py's (reading, padding, tiling pictures)
    VLMDataset(...)[i] -> {"input_ids", "labels", "pixel_values": Tensor[3, H, W] ([n, 3, H, W]: a list) | None,
        "tower_features", "id", "skipped"};  .lengths;  .skipped: [(index, id, problem)] left out at load;
        read_skip_log(*paths)
    collate(batch, pad_token_id, padding_side) -> {"input_ids", "attention_mask", "labels", "images", ...}
    check(records, image_folder, tokenizer, ...) -> {"problems", "notes", "lengths", ...}: what training refuses

Text format (TinyLLaVA Factory, = LLaVA-1.5 vicuna_v1 with the LLM's own EOS; LLaVA "plain" for pretraining):
    SYSTEM USER: <image>\\n{q1} ASSISTANT: {a1}<eos>USER: {q2} ASSISTANT: {a2}<eos>
The image placeholder is moved to the front of its turn. A leading message from neither human nor gpt (a
per-sample system prompt) is dropped, as in the original. Labels are built by construction: while rendering we
record the character spans the model must learn (each answer from the space after "ASSISTANT:" through its EOS;
for "plain", the caption and its "\\n"); every `<image>`-separated chunk is tokenized once with offsets and a token
is supervised iff it covers a character of such a span. This equals the original's round-re-tokenising masks
wherever those are consistent, and never silently masks a whole sample: anything odd raises DataError naming
file, record and id, ending in the problem's code (DataError.code, listed in check_data.py): "... [image-missing]".

Several images: "image" a list, one `<image>` per entry in order in any human turn; a turn with one keeps the
original's relocation, a turn with several keeps them in place. Tiling (max_tiles > 0): an image is its global view
and the tiles of its grid (modeling_tinyllava_nano.choose_grid), and its `<image>` becomes
connectors.image_tokens(num_image_tokens, grid) sentinels; samples carry "image_grids". Not done here (on purpose):
the original's "anyres" (dead code there), dummy zero images for text-only samples (those rows carry no image at
all, so the vision tower never runs on them),
tokenizers that append EOS to every call.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from connectors import image_tokens, most_image_tokens, token_count  # noqa: F401 (data.token_count)
from images import (MAX_IMAGE_PIXELS, MAX_PAD_SIDE, NOT_REGULAR, image_inputs, load_image,  # noqa: F401 (re-exported)
                    preprocess_image, preprocess_views, short_side)
from modeling_tinyllava_nano import choose_grid
from records import (IMAGE_PLACEHOLDER, MAX_IMAGES, NOT_BAD, BadLine, DataError, _error, _id, _json,  # noqa: F401
                     _turns, _where, load_records, read_records, record_images, record_problems, scan)   # re-exported

IGNORE_INDEX = -100  # label of tokens that take no loss (torch CrossEntropyLoss default ignore_index)
IMAGE_TOKEN_INDEX = -200  # sentinel id at image positions; model.py writes image features there (LLaVA's value)

# ---- Chat templates (strings from TinyLLaVA Factory data/template/*.py, see reference §5.3) ----------------------
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class ChatTemplate:
    system: str                # once, before the first user turn
    user: str                  # a user turn; "{q}" = the question, image placeholder moved to its front
    image: str                 # what the placeholder becomes at the front of the question
    prompt: str                # opens the assistant turn; alone at the end it is the generation prompt
    answer: str                # "{a}" = the answer; this piece plus `eos` is what the model learns
    eos: str                   # end of every answer; must be one token of the LLM's tokenizer
    keep_question: bool = True  # False for LLaVA "plain" pretraining: the human text is thrown away


@dataclass(frozen=True)
class HFChatTemplate:
    """Use the tokenizer's own `apply_chat_template` (any other LLM). The image becomes "<image>\\n" at the front
    of its user message; supervised spans are found by rendering message prefixes and diffing the strings, so the
    template must be prefix-stable (rendering a shorter conversation gives a prefix of the longer one)."""


def _vicuna(eos: str) -> ChatTemplate:
    # "ASSISTANT:" + " {a}": the original's separator " ASSISTANT: " ends in the space that BPE merges into the
    # first answer token (its `instruction_len - 1`), so that space belongs to the supervised answer piece.
    return ChatTemplate(system=SYSTEM + " ", user="USER: {q} ", image=IMAGE_PLACEHOLDER + "\n",
                        prompt="ASSISTANT:", answer=" {a}", eos=eos)


TEMPLATES = {
    "phi": _vicuna("<|endoftext|>"),           # phi-2, stablelm-2
    "llama": _vicuna("</s>"),                  # TinyLlama, OpenELM (Llama-2 tokenizer)
    "gemma": _vicuna("<eos>"),
    "qwen2_base": _vicuna("<|endoftext|>"),
    "qwen2_instruct": _vicuna("<|im_end|>"),
    # LLaVA "plain": "<image>" + caption + "\n". (The original writes "<image>" for every turn; captions are
    # single-turn, and here a turn only gets the image if its question had the placeholder.)
    "pretrain": ChatTemplate(system="", user="{q}", image=IMAGE_PLACEHOLDER, prompt="", answer="{a}\n", eos="",
                             keep_question=False),
    "auto": HFChatTemplate(),
}


def get_template(template):
    if isinstance(template, (ChatTemplate, HFChatTemplate)):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def _question(t: ChatTemplate, q: str) -> str:
    n_images = q.count(IMAGE_PLACEHOLDER)
    q = q if t.keep_question else IMAGE_PLACEHOLDER * n_images
    if n_images == 1:  # exactly the original's relocation, including its two strip() calls
        q = (t.image + q.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
    elif n_images > 1:  # several images in one turn stay where they are, interleaved with the text
        q = q.strip()
    return t.user.replace("{q}", q, 1)


def render(conversations, template, tokenizer=None, for_generation=False) -> tuple[str, list[tuple[int, int]]]:
    """Conversation -> (text, [(start, end)] character spans to supervise). `tokenizer` is needed only for "auto"."""
    t = get_template(template)
    turns = _turns(conversations, for_generation)
    if isinstance(t, HFChatTemplate):
        return _render_hf(turns, tokenizer, for_generation)
    text, spans = t.system, []
    for q, a in turns:
        text += _question(t, q) + t.prompt
        if a is not None:
            piece = t.answer.replace("{a}", a, 1) + t.eos
            spans.append((len(text), len(text) + len(piece)))
            text += piece
    return text, spans


def _render_hf(turns, tokenizer, for_generation):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'auto' needs a tokenizer with a chat_template")
    messages = []
    for q, a in turns:
        if q.count(IMAGE_PLACEHOLDER) == 1:   # several stay in place, as in _question
            q = IMAGE_PLACEHOLDER + "\n" + q.replace(IMAGE_PLACEHOLDER, "").strip()
        messages.append({"role": "user", "content": q})
        if a is not None:
            messages.append({"role": "assistant", "content": a})

    def chat(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    text = chat(messages, for_generation)
    spans = []
    for k in range(1, len(messages), 2):  # assistant messages
        before, through = chat(messages[:k], True), chat(messages[: k + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError("the tokenizer's chat template is not prefix-stable, cannot locate assistant turn "
                            f"{k // 2}; write a ChatTemplate for this LLM instead", "template-error")
        # the newline a template puts between turns is glue, not something the model must produce
        spans.append((len(before), len(through.rstrip())))
    # Templates that write the BOS text themselves would get a second BOS from the tokenizer: keep one.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        text, spans = text[len(bos):], [(s - len(bos), e - len(bos)) for s, e in spans]
    return text, spans


# ---- Tokenisation with labels by construction --------------------------------------------------------------------
def encode(conversations, template, tokenizer, num_image_tokens, max_length=None, for_generation=False) -> dict:
    """Token ids and labels of one conversation; each image placeholder becomes `num_image_tokens` sentinels (a
    list: the k-th placeholder its k-th entry, tiled images' counts).

    Ids equal LLaVA's `tokenizer_image_token`: the text is split on "<image>", each chunk is tokenized with the
    tokenizer's default special tokens, and the BOS it adds to every chunk but the first is dropped. A token is
    supervised iff its characters overlap a span from `render`. `max_length` counts image tokens; a cut never
    splits an image (it moves before the image, dropping it), and a sample left with nothing to learn raises.
    """
    text, spans = render(conversations, template, tokenizer, for_generation)
    supervised = bytearray(len(text))  # 1 = this character is to be learned
    for s, e in spans:
        supervised[s:e] = b"\x01" * (e - s)

    counts = num_image_tokens if isinstance(num_image_tokens, (list, tuple)) else None
    ids, labels, base = [], [], 0
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            n = counts[k - 1] if counts is not None else num_image_tokens
            ids += [IMAGE_TOKEN_INDEX] * n
            labels += [IGNORE_INDEX] * n
            base += len(IMAGE_PLACEHOLDER)
        enc = tokenizer(chunk, return_offsets_mapping=True)
        chunk_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        # An added BOS has the empty offset (0, 0); a literal BOS string in the text does not.
        if k > 0 and chunk_ids and chunk_ids[0] == tokenizer.bos_token_id and tuple(offsets[0]) == (0, 0):
            chunk_ids, offsets = chunk_ids[1:], offsets[1:]
        prev_end = 0
        for tok_id, (s, e) in zip(chunk_ids, offsets):
            # Extend each token back to where the previous one ended: tokenizers that trim offsets (GPT-2's
            # ByteLevel trim_offsets) report " A" as "A", and the space is what makes "ĠA" an answer token.
            s = min(s, prev_end)
            prev_end = max(prev_end, e)
            ids.append(tok_id)
            labels.append(tok_id if 1 in supervised[base + s: base + e] else IGNORE_INDEX)
        base += len(chunk)
    if for_generation:
        labels = [IGNORE_INDEX] * len(ids)
        if max_length is not None and len(ids) > max_length:
            raise DataError(f"prompt is {len(ids)} tokens (incl. images), longer than max_length={max_length}",
                            "prompt-too-long")
    else:
        if max_length is not None and len(ids) > max_length:
            cut = max_length
            while cut > 0 and ids[cut] == IMAGE_TOKEN_INDEX and ids[cut - 1] == IMAGE_TOKEN_INDEX:
                cut -= 1  # the cut fell inside an image: cut before it instead
            n = len(ids)
            ids, labels = ids[:cut], labels[:cut]
            if all(x == IGNORE_INDEX for x in labels):
                per = (f"{num_image_tokens} per image" if counts is None else
                       "+".join(map(str, counts)) + " for its images")
                raise DataError(f"answer truncated away at max_length={max_length} (sample is {n} tokens, "
                                f"{per})", "answer-truncated")
        if all(x == IGNORE_INDEX for x in labels):
            raise DataError("no supervised tokens", "no-supervised-tokens")
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


# ---- Dataset and collator ----------------------------------------------------------------------------------------
class VLMDataset(torch.utils.data.Dataset):
    """LLaVA-format samples; text-only samples have pixel_values None (no dummy image).

    bad_samples="error" raises DataError at the first bad record (scan's problems: at construction; an image that
    does not load, an answer truncated away: when read). "skip" leaves records with scan's problems out (.skipped),
    and replaces a sample that fails when read by the next good one of the same modality (sample["skipped"]). Each
    skip is printed and, given `skip_log` (one per rank), appended to that JSONL file at once (read_skip_log)."""

    def __init__(self, records, tokenizer, image_processor, template, num_image_tokens, max_length,
                 image_folder=None, image_aspect_ratio="square", bad_samples="error", feature_cache=None,
                 allow_outside_images=False, skip_log=None, max_images=MAX_IMAGES, max_tiles=0):
        if bad_samples not in ("error", "skip"):
            raise ValueError(f"unknown bad_samples policy {bad_samples!r}; valid: error, skip")
        self.source = str(records) if isinstance(records, (str, os.PathLike)) else "<records>"
        records = read_records(records) if isinstance(records, (str, os.PathLike)) else records
        self.records, self.origin, self.skipped, self.skip_log, dups = [], [], [], skip_log, []
        for i, record, problems in scan(records, allow_outside_images, max_images):
            dups += [i] * any(c in NOT_BAD for c, _ in problems)   # listed by the check, trained on (below)
            problems = [(c, m) for c, m in problems if c not in NOT_BAD]
            if not problems:
                self.records.append(record)
                self.origin.append(i)   # index in the source file, for messages
            elif bad_samples == "error":
                raise _error(self.source, i, record, problems)
            else:
                self.skipped.append(self._skip(i, record, "load", _error(self.source, i, record, problems)))
        if dups:   # ids only name records in messages; LLaVA-style sets reuse an image's id across conversations
            print(f"{self.source}: {len(dups)} records reuse an earlier id (first: record {dups[0]}) [duplicate-id]")
        if not self.records:
            raise DataError(f"{self.source}: no usable records ({len(self.skipped)} skipped)", "no-records")
        self.bad_samples, self.feature_cache = bad_samples, feature_cache   # model.FeatureCache: no pixels
        self.tokenizer, self.image_processor, self.side = tokenizer, image_processor, short_side(image_processor)
        self.template = get_template(template)
        self.num_image_tokens, self.max_length, self.max_tiles = num_image_tokens, max_length, max_tiles
        self.image_folder, self.image_aspect_ratio = image_folder, image_aspect_ratio
        if image_aspect_ratio not in ("square", "pad"):
            raise ValueError(f"unknown image_aspect_ratio {image_aspect_ratio!r}; valid: square, pad")
        if image_folder is None and any(r.get("image") is not None for r in self.records):
            raise ValueError(f"{self.source} has image samples but image_folder is None")
        eos = getattr(self.template, "eos", "")
        if eos and len(tokenizer(eos, add_special_tokens=False).input_ids) != 1:
            raise ValueError(f"the chat template ends answers with {eos!r}, which this tokenizer does not know as "
                             "one token; pick the template that matches the LLM (or 'auto')")
        self._lengths = None

    def _skip(self, index, record, when, error) -> tuple:
        print(f"skipping {error}", flush=True)
        if self.skip_log:   # one write of one line, flushed: a crash or a kill right after loses nothing
            row = {"index": index, "id": _id(record), "when": when, "code": error.code, "problem": str(error)}
            os.makedirs(os.path.dirname(os.path.abspath(self.skip_log)), exist_ok=True)
            with open(self.skip_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=repr) + "\n")
        return index, _id(record), str(error)

    def __len__(self):
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Rough token count per sample (characters / 4, plus the image tokens: tiled, as if each image had the grid
        of most tokens), positive for image samples and negative for text-only ones like the original's
        modality_lengths; for length-grouped sampling only."""
        if self._lengths is None:
            self._lengths, per = [], most_image_tokens(self.num_image_tokens, self.max_tiles)
            for r in self.records:
                n = sum(len(turn["value"]) for turn in r["conversations"]) // 4 + 1
                self._lengths.append(n + per * len(record_images(r)) if r.get("image") else -n)
        return self._lengths

    def sample(self, i) -> dict:
        record = self.records[i]
        if self.max_tiles:
            return self._tiled_sample(i, record)
        try:
            out = encode(record["conversations"], self.template, self.tokenizer, self.num_image_tokens,
                         self.max_length)
            # images may have been cut away by truncation (whole ones, from the end): the sample keeps the rest
            kept = int((out["input_ids"] == IMAGE_TOKEN_INDEX).sum()) // max(1, self.num_image_tokens)
            pixel_values, feats = self._images(record_images(record)[:kept])
            if pixel_values is not None and not isinstance(record["image"], list):
                pixel_values = pixel_values[0]   # one image as a string: [3, H, W] as ever
            if feats is not None and not isinstance(record["image"], list):
                feats = tuple(f[0] for f in feats) if isinstance(feats, tuple) else feats[0]
        except Exception as e:  # noqa: BLE001 - a tokenizer's TypeError on one odd text, too: this record's problem
            code, what = (e.code, e) if isinstance(e, DataError) else ("internal-error", f"{type(e).__name__}: {e}")
            raise DataError(f"{_where(self.source, self.origin[i], record)}: {what} [{code}]", code) from None
        return {**out, "pixel_values": pixel_values, "tower_features": feats, "id": record.get("id")}

    def _tiled_sample(self, i, record) -> dict:
        """sample() with tiling: the images' grids first (their token counts), then the text; always stacks (the
        views of every kept image, [views, 3, H, W] or [views, tokens, D]) and image_grids [kept, 2]."""
        try:
            names = record_images(record)
            views = [self._views(name) for name in names]
            counts = [image_tokens(self.num_image_tokens, grid) for _, grid in views]
            out = encode(record["conversations"], self.template, self.tokenizer, counts, self.max_length)
            slots, kept = int((out["input_ids"] == IMAGE_TOKEN_INDEX).sum()), 0   # truncation drops whole images
            while kept < len(counts) and slots >= counts[kept]:
                slots, kept = slots - counts[kept], kept + 1
            views = views[:kept]
            grids = torch.tensor([grid for _, grid in views], dtype=torch.long).reshape(-1, 2) if views else None
            data = [v for v, _ in views]
            pixel_values = torch.cat(data) if data and self.feature_cache is None else None
            feats = None
            if data and self.feature_cache is not None:
                feats = tuple(map(torch.cat, zip(*data))) if isinstance(data[0], tuple) else torch.cat(data)
        except Exception as e:  # noqa: BLE001 - as in sample()
            code, what = (e.code, e) if isinstance(e, DataError) else ("internal-error", f"{type(e).__name__}: {e}")
            raise DataError(f"{_where(self.source, self.origin[i], record)}: {what} [{code}]", code) from None
        return {**out, "pixel_values": pixel_values, "tower_features": feats, "image_grids": grids,
                "id": record.get("id")}

    def _views(self, name):
        """Tiling: (the image's views as pixels, or its tower outputs from the feature cache; its grid)."""
        if self.feature_cache is None:
            image = load_image(os.path.join(self.image_folder, name), self.image_aspect_ratio, self.side)
            return preprocess_views(image, self.image_processor, self.image_aspect_ratio, self.max_tiles)
        found = self.feature_cache.load(self.image_folder, name)
        if found is None:
            load_image(os.path.join(self.image_folder, name), self.image_aspect_ratio, self.side)   # its own first
            raise DataError(f"image {name} is not in the feature cache {self.feature_cache.dir}", "feature-cache-miss")
        return found

    def _images(self, names):
        """(pixels [n, 3, H, W], None) or, with a feature cache, (None, tower outputs [n, ...] or a pair of them)."""
        if not names:
            return None, None
        if self.feature_cache is None:
            return torch.stack([preprocess_image(load_image(os.path.join(self.image_folder, name),
                                                            self.image_aspect_ratio, self.side), self.image_processor,
                                                 self.image_aspect_ratio) for name in names]), None
        feats = []
        for name in names:
            feats.append(self.feature_cache.load(self.image_folder, name))
            if feats[-1] is None:
                load_image(os.path.join(self.image_folder, name), self.image_aspect_ratio, self.side)   # its own first
                raise DataError(f"image {name} is not in the feature cache {self.feature_cache.dir}",
                                "feature-cache-miss")
        return None, tuple(map(torch.stack, zip(*feats))) if isinstance(feats[0], tuple) else torch.stack(feats)

    def __getitem__(self, i) -> dict:
        if self.bad_samples == "error":
            return self.sample(i)
        skipped, modality = [], self.records[i].get("image") is not None
        for j in [k % len(self) for k in range(i, i + len(self))]:
            if (self.records[j].get("image") is not None) != modality:
                continue   # a replacement of the same modality keeps the ranks' modality batches aligned
            try:
                return {**self.sample(j), "skipped": skipped}
            except DataError as e:
                skipped.append(self._skip(self.origin[j], self.records[j], "read", e))
        raise DataError(f"{self.source}: no readable sample left of this modality ({len(skipped)} failed)",
                        "no-records")


def read_skip_log(*paths) -> list[dict]:
    """Skip-log rows by index, one per record (logged each time it was met); a line torn by a crash is left out."""
    rows = [_json(line) for p in paths if os.path.isfile(p) for line in Path(p).read_text("utf-8").splitlines()]
    return sorted({r["index"]: r for r in reversed(rows) if isinstance(r, dict)}.values(), key=lambda r: r["index"])


def collate(batch, pad_token_id, padding_side="right") -> dict:
    """Pad a list of samples into a batch. "left" padding is for batched generation.

    The attention mask comes from the sample lengths, not from `input_ids != pad_token_id`, which would hide real
    EOS tokens when pad == eos (phi, qwen2_base). `images` holds the pictures of the samples that have one, in
    batch order: model.py fills the sentinel positions row by row in that same order.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (TinyLLaVA uses the unk token)")
    if padding_side not in ("right", "left"):
        raise ValueError(f"unknown padding_side {padding_side!r}; valid: right, left")
    lengths = [len(s["input_ids"]) for s in batch]
    B, L = len(batch), max(lengths)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for row, (sample, n) in enumerate(zip(batch, lengths)):
        cols = slice(0, n) if padding_side == "right" else slice(L - n, L)
        input_ids[row, cols] = sample["input_ids"]
        labels[row, cols] = sample["labels"]
        attention_mask[row, cols] = 1
    pictures = [_many(s["pixel_values"], 3) for s in batch if s.get("pixel_values") is not None]
    images = torch.cat(pictures) if pictures else None
    grids = [s["image_grids"] for s in batch if s.get("image_grids") is not None]   # tiling: (rows, cols) per image
    feats = [s["tower_features"] for s in batch if s.get("tower_features") is not None]
    if feats:   # cached tower outputs instead of pictures (a pair per image for MoF)
        feats = tuple(torch.cat([_many(x, 2) for x in f]) for f in zip(*feats)) if isinstance(feats[0], tuple) \
            else torch.cat([_many(x, 2) for x in feats])
    n_images = len(images) if images is not None else len(feats[0] if isinstance(feats, tuple) else feats)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images,
            "tower_features": feats if len(feats) else None, "n_images": n_images,   # tower inputs (tiled: views)
            "image_grids": torch.cat(grids) if grids else None,
            "skipped": [x for s in batch for x in s.get("skipped", ())]}


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "images", "tower_features", "image_grids")


def model_inputs(batch) -> dict:
    """What of a collated batch the model's forward takes, by name: model(**model_inputs(batch))."""
    return {k: batch[k] for k in MODEL_INPUTS}


def _many(x, dims):   # one image's tensor ([3, H, W]; [tokens, D]) as a stack of one, a stack as it is
    return x[None] if x.dim() == dims else x


# ---- The data check (check_data.py prints it) ----------------------------------------------------------------------
def check(records, image_folder=None, tokenizer=None, template="phi", num_image_tokens=0, max_length=None,
          allow_outside_images=False, on_problem=None, progress=False, image_aspect_ratio="square",
          max_images=MAX_IMAGES, max_tiles=0, tile=None, side=None):
    """Every record as training reads it (scan, then load_image and encode with training's settings) -> {"problems":
    [(index, id, code, message)], "notes": [(index, id, message)], "lengths": [tokens], "image_tokens": [tokens of
    each image read], "over_max_length": n, ...}; on_problem(index, record, code, message) is called as each problem
    or note (code "note") is found. Tiled (max_tiles, tile = the tower's (H, W)): each image's count from its grid
    (num_image_tokens is then per view); the images' tokens together must leave room for text in max_length.
    side: the side the tower's processor resizes an image's short side to (images.short_side), so that "square"
    refuses what training will (images.square_problem)."""
    from tqdm import tqdm
    problems, notes, lengths, over, per_image = [], [], [], 0, []
    bar = tqdm(total=len(records), unit=" records", file=sys.stderr, disable=not progress)
    for i, r, found in scan(records, allow_outside_images, max_images):
        rid = r.get("id") if isinstance(r, dict) else None
        good = lambda: all(c in NOT_BAD for c, _ in found)  # noqa: E731 - a record training keeps, so far
        try:
            counts = [num_image_tokens] * len(record_images(r)) if good() else []   # unread tiled: as a 1x1 grid
            for k, name in enumerate(record_images(r) if good() and image_folder is not None else ()):   # training:
                try:                                                                                     # when read
                    image = load_image(os.path.join(image_folder, name), image_aspect_ratio, side)
                    if max_tiles:
                        counts[k] = image_tokens(num_image_tokens, choose_grid(*image.size, tile, max_tiles))
                    per_image.append(counts[k])
                except DataError as e:
                    found.append((e.code, str(e)))
            if good() and max_length and sum(counts) >= max_length:
                per = (f"x {num_image_tokens} tokens" if not max_tiles else
                       f"({'+'.join(map(str, counts))} tokens, tiled)")
                found.append(("images-over-max-length", f"{len(counts)} images {per} leave no room for text in "
                                                        f"max_length={max_length}"))
            if good() and r["conversations"][0]["from"] != "human":
                notes.append((i, rid, f"first message is from {r['conversations'][0]['from']!r}: dropped, as the "
                                      "original does"))
                if on_problem:
                    on_problem(i, r, "note", notes[-1][2])
            if good() and tokenizer is not None:
                try:
                    n = len(encode(r["conversations"], template, tokenizer, counts)["input_ids"])
                    lengths.append(n)
                    if max_length and n > max_length:
                        over += 1
                        encode(r["conversations"], template, tokenizer, counts, max_length)
                except DataError as e:
                    found.append((e.code, str(e)))
        except Exception as e:  # noqa: BLE001 - the check reports what it cannot handle and goes on
            found.append(("internal-error", f"{type(e).__name__}: {e}"))
        for code, message in found:
            problems.append((i, rid, code, message))
            if on_problem:
                on_problem(i, r, code, message)
        bar.update()
    bar.close()
    image = sum(isinstance(r, dict) and r.get("image") is not None for r in records)
    return {"records": len(records), "image": image, "text_only": len(records) - image, "problems": problems,
            "notes": notes, "lengths": lengths, "image_tokens": per_image, "over_max_length": over}

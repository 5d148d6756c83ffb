"""data.py: exact template strings, hand-checked ids/labels, parity with TinyLLaVA Factory's masking algorithm,
image expansion and truncation, record validation, image preprocessing, collation. CPU only, no network."""
import json
import os
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, DataError, collate, encode, render  # noqa: E402
from tiny_tokenizers import make_tokenizer  # noqa: E402

SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.")


def conv(*values, system=None):
    """conv(q1, a1, q2, a2, ...) -> LLaVA conversations; a trailing None answer = generation request."""
    turns = [{"from": "system", "value": system}] if system is not None else []
    for i, v in enumerate(values):
        turns.append({"from": "human" if i % 2 == 0 else "gpt", "value": v})
    return turns


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """style -> tokenizer, with TinyLLaVA's `post_load` pad choice (pad := unk for phi / llama / gemma)."""
    out = {}
    for style in ("phi", "llama", "gemma", "qwen2", "qwen2_base"):
        tok = make_tokenizer(style, tmp_path_factory.mktemp(style))
        if style in ("phi", "llama", "gemma"):
            tok.pad_token = tok.unk_token
        out[style] = tok
    return out


def show(out, tok):
    """Token strings; supervised ones in [brackets], image sentinels as <IMG>."""
    res = []
    for i, lab in zip(out["input_ids"].tolist(), out["labels"].tolist()):
        s = "<IMG>" if i == IMAGE_TOKEN_INDEX else tok.convert_ids_to_tokens(i)
        assert lab in (IGNORE_INDEX, i)
        res.append(f"[{s}]" if lab != IGNORE_INDEX else s)
    return res


# ------------------------------------------------------------------------------------------------------------
# Rendered strings

def test_system_string_is_the_original():
    assert data.SYSTEM == SYS


@pytest.mark.parametrize("name,eos", [("phi", "<|endoftext|>"), ("llama", "</s>"), ("gemma", "<eos>"),
                                      ("qwen2_base", "<|endoftext|>"), ("qwen2_instruct", "<|im_end|>")])
def test_render_vicuna_templates(name, eos):
    one = conv("What is shown?\n<image>", "A cat.")  # image at the END of the question -> moved to the front
    text, spans = render(one, name)
    assert text == SYS + " USER: <image>\nWhat is shown? ASSISTANT: A cat." + eos
    assert [text[s:e] for s, e in spans] == [" A cat." + eos]

    two = conv("<image>\nWhat is shown?", "A cat.", "Why?", "Yes.")
    text, spans = render(two, name)
    assert text == SYS + f" USER: <image>\nWhat is shown? ASSISTANT: A cat.{eos}USER: Why? ASSISTANT: Yes.{eos}"
    assert [text[s:e] for s, e in spans] == [" A cat." + eos, " Yes." + eos]

    text, _ = render(conv("Why is the sky blue?", "Because."), name)  # text-only
    assert text == SYS + " USER: Why is the sky blue? ASSISTANT: Because." + eos

    text, spans = render(conv("What is shown?<image>", None), name, for_generation=True)
    assert text == SYS + " USER: <image>\nWhat is shown? ASSISTANT:" and spans == []  # no trailing space
    text, _ = render(conv("<image>\nWhat is shown?", "A cat.", "Why?"), name, for_generation=True)
    assert text == SYS + f" USER: <image>\nWhat is shown? ASSISTANT: A cat.{eos}USER: Why? ASSISTANT:"


def test_render_edge_cases():
    # original strips after relocating: a question that is only the image renders as "<image>" (no newline)
    assert render(conv("<image>", "A cat."), "phi")[0] == SYS + " USER: <image> ASSISTANT: A cat.<|endoftext|>"
    # image in the middle, surrounded by spaces
    assert render(conv("What  <image>  is this?", "A cat."), "phi")[0] == \
        SYS + " USER: <image>\nWhat    is this? ASSISTANT: A cat.<|endoftext|>"
    # a leading system message is dropped, like TinyLLaVA's _get_list_from_message
    assert render(conv("Hi?", "Yes.", system="Be brief."), "llama")[0] == SYS + " USER: Hi? ASSISTANT: Yes.</s>"
    # a text-only question is not stripped (the original only strips when it moves an image)
    assert render(conv(" Hi? ", "Yes."), "gemma")[0] == SYS + " USER:  Hi?  ASSISTANT: Yes.<eos>"


def test_render_pretrain():
    text, spans = render(conv("<image>\nRender a clear and concise summary of the photo.", "A red car."), "pretrain")
    assert text == "<image>A red car.\n" and [text[s:e] for s, e in spans] == ["A red car.\n"]
    assert render(conv("Describe.<image>", None), "pretrain", for_generation=True)[0] == "<image>"


def test_render_auto_qwen2(toks):
    text, spans = render(conv("What is shown?<image>", "A cat.", "Why?", "Yes."), "auto", toks["qwen2"])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
                    "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n")
    assert [text[s:e] for s, e in spans] == ["A cat.<|im_end|>", "Yes.<|im_end|>"]
    text, _ = render(conv("Why?", None), "auto", toks["qwen2"], for_generation=True)
    assert text.endswith("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")


def test_unknown_template_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: phi, llama, gemma, qwen2_base, qwen2_instruct, pretrain, auto"):
        render(conv("Hi?", "Yes."), "vicuna")


# ------------------------------------------------------------------------------------------------------------
# Hand-checked ids and labels

BYTE_SYS = ["A", "Ġchat", "Ġbetween", "Ġa", "Ġcurious", "Ġuser", "Ġand", "Ġan", "Ġartificial", "Ġintelligence",
            "Ġassistant", ".", "ĠThe", "Ġassistant", "Ġgives", "Ġhelpful", ",", "Ġdetailed", ",", "Ġand", "Ġpolite",
            "Ġanswers", "Ġto", "Ġthe", "Ġuser", "'s", "Ġquestions", "."]
SP_SYS = ["▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial", "▁intelligence",
          "▁assistant", ".", "▁The", "▁assistant", "▁gives", "▁helpful", ",", "▁detailed", ",", "▁and", "▁polite",
          "▁answers", "▁to", "▁the", "▁user", "'", "s", "▁questions", "."]
TWO_TURNS = conv("What is shown?\n<image>", "A cat.", "Why?", "Yes.")


def test_tokens_phi(toks):
    out = encode(TWO_TURNS, "phi", toks["phi"], num_image_tokens=1)
    assert show(out, toks["phi"]) == BYTE_SYS + [
        "Ġ", "USER", ":", "Ġ", "<IMG>", "Ċ", "What", "Ġis", "Ġshown", "?", "ĠASSISTANT", ":",
        "[ĠA]", "[Ġcat]", "[.]", "[<|endoftext|>]",
        "USER", ":", "ĠWhy", "?", "ĠASSISTANT", ":", "[ĠYes]", "[.]", "[<|endoftext|>]"]


def test_tokens_qwen2(toks):
    # Qwen2's split regex glues a leading symbol to a word (">USER" in the corpus), so "USER" never became a piece
    for style, name, eos in [("qwen2", "qwen2_instruct", "<|im_end|>"), ("qwen2_base", "qwen2_base", "<|endoftext|>")]:
        out = encode(TWO_TURNS, name, toks[style], num_image_tokens=1)
        assert show(out, toks[style]) == BYTE_SYS + [
            "Ġ", "U", "SER", ":", "Ġ", "<IMG>", "Ċ", "What", "Ġis", "Ġshown", "?", "ĠASSISTANT", ":",
            "[ĠA]", "[Ġcat]", "[.]", f"[{eos}]", "U", "SER", ":", "ĠWhy", "?", "ĠASSISTANT", ":", "[ĠYes]", "[.]",
            f"[{eos}]"]


def test_tokens_llama(toks):
    # one leading BOS; the chunk after the image gets its own "▁" prefix (tokenized separately, as in LLaVA)
    out = encode(TWO_TURNS, "llama", toks["llama"], num_image_tokens=1)
    assert show(out, toks["llama"]) == ["<s>"] + SP_SYS + [
        "▁", "USER", ":", "▁", "<IMG>", "▁", "\n", "W", "hat", "▁is", "▁shown", "?", "▁ASSISTANT", ":",
        "[▁A]", "[▁cat]", "[.]", "[</s>]", "USER", ":", "▁Why", "?", "▁ASSISTANT", ":", "[▁Yes]", "[.]", "[</s>]"]


def test_tokens_gemma(toks):
    out = encode(TWO_TURNS, "gemma", toks["gemma"], num_image_tokens=1)
    assert show(out, toks["gemma"]) == ["<bos>", "A"] + SP_SYS[1:] + [
        "▁", "USER", ":", "▁", "<IMG>", "\n", "What", "▁is", "▁shown", "?", "▁ASSISTANT", ":",
        "[▁A]", "[▁cat]", "[.]", "[<eos>]", "USER", ":", "▁Why", "?", "▁ASSISTANT", ":", "[▁Yes]", "[.]", "[<eos>]"]


def test_tokens_pretrain(toks):
    caption = conv("<image>\nRender a clear and concise summary of the photo.", "A red car.")
    assert show(encode(caption, "pretrain", toks["phi"], 1), toks["phi"]) == \
        ["<IMG>", "[A]", "[Ġred]", "[Ġcar]", "[.]", "[Ċ]"]
    assert show(encode(caption, "pretrain", toks["llama"], 1), toks["llama"]) == \
        ["<s>", "<IMG>", "[▁A]", "[▁red]", "[▁car]", "[.]", "[\n]"]


def test_tokens_auto(toks):
    # answer + end-of-turn token are supervised; "assistant\n" and the "\n" glue after <|im_end|> are not
    out = encode(conv("Why?", "A cat."), "auto", toks["qwen2"], 1)
    assert show(out, toks["qwen2"]) == [
        "<|im_start|>", "s", "yst", "em", "Ċ", "Y", "ou", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".", "<|im_end|>",
        "Ċ", "<|im_start|>", "user", "Ċ", "Wh", "y", "?", "<|im_end|>", "Ċ", "<|im_start|>", "a", "ss", "istant", "Ċ",
        "[A]", "[Ġcat]", "[.]", "[<|im_end|>]", "Ċ"]


def test_auto_template_with_literal_bos_keeps_one_bos(tmp_path):
    tok = make_tokenizer("llama", tmp_path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    c = conv("<image>\nWhy?", "Yes.")
    assert render(c, "auto", tok) == ("user: <image>\nWhy?</s>assistant: Yes.</s>", [(33, 41)])
    assert show(encode(c, "auto", tok, 1), tok) == [
        "<s>", "▁user", ":", "▁", "<IMG>", "▁", "\n", "W", "hy", "?", "</s>", "a", "ss", "istant", ":",
        "[▁Yes]", "[.]", "[</s>]"]


def test_generation_prompt_is_prefix_of_training_ids(toks):
    for style, name in [("phi", "phi"), ("llama", "llama"), ("gemma", "gemma"), ("qwen2", "qwen2_instruct")]:
        tok = toks[style]
        train = encode(conv("<image>\nWhat is shown?", "A cat."), name, tok, 3)
        gen = encode(conv("<image>\nWhat is shown?", None), name, tok, 3, for_generation=True)
        n = len(gen["input_ids"])
        assert torch.equal(gen["input_ids"], train["input_ids"][:n])
        assert (gen["labels"] == IGNORE_INDEX).all()
        assert (train["labels"][:n] == IGNORE_INDEX).all() and (train["labels"][n] != IGNORE_INDEX)


def test_trimmed_offsets_give_same_labels(toks, tmp_path):
    """GPT-2's own tokenizer.json trims offsets (" A" -> "A"); the labels must not depend on that."""
    from tokenizers import processors
    tok = make_tokenizer("phi", tmp_path)
    cases = [conv("<image>\nWhat is shown?", "A cat."), conv("Why?", "\nYes.\n\nNo."), conv("Why?", "  two spaces")]
    ref = [encode(c, "phi", tok, 2) for c in cases]
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    assert tok("ASSISTANT: A", return_offsets_mapping=True)["offset_mapping"][-1] == (11, 12)  # trimming is on
    for c, r in zip(cases, ref):
        out = encode(c, "phi", tok, 2)
        assert torch.equal(out["input_ids"], r["input_ids"]) and torch.equal(out["labels"], r["labels"])


# ------------------------------------------------------------------------------------------------------------
# Parity with the original algorithm (TinyLLaVA Factory data/template/base.py + llama/gemma/pretrain templates),
# re-implemented here from the description in reference §5.4: re-tokenise each round and count tokens.

ORIGINAL = {  # name -> (system, image slot, user slot, assistant slot, separator, eos)
    **{name: (SYS + " ", "<image>\n{}", "USER: {} ", "ASSISTANT: {}" + eos, " ASSISTANT: ", eos)
       for name, eos in [("phi", "<|endoftext|>"), ("llama", "</s>"), ("gemma", "<eos>"),
                         ("qwen2_base", "<|endoftext|>"), ("qwen2_instruct", "<|im_end|>")]},
    "pretrain": ("", None, None, "{}\n", "", ""),
}


def ref_prompt(name, conversations):
    system, image_slot, user_slot, assistant_slot, _, _ = ORIGINAL[name]
    msgs = conversations[1:] if conversations[0]["from"] != "human" else conversations
    qs, ans = [m["value"] for m in msgs[0::2]], [m["value"] for m in msgs[1::2]]
    prompt = ""
    for i, (q, a) in enumerate(zip(qs, ans)):
        prompt += system if i == 0 else ""
        if "<image>" in q:
            q = q.replace("<image>", "").strip()
            q = (image_slot.format(q) if image_slot else "").strip()
        prompt += user_slot.format(q) if user_slot else "<image>"
        prompt += assistant_slot.format(a)
    return prompt


def ref_tokenizer_image_token(prompt, tok):
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    keep_bos = bool(chunks and chunks[0] and chunks[0][0] == tok.bos_token_id)
    ids = [chunks[0][0]] if keep_bos else []
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:] if keep_bos else chunk)  # every chunk loses its own BOS
    return ids


def ref_encode(name, conversations, tok):
    """-> (input_ids, labels, mismatch) exactly as TinyLLaVA Factory computes them."""
    prompt = ref_prompt(name, conversations)
    ids = ref_tokenizer_image_token(prompt, tok)
    labels = list(ids)
    if name == "pretrain":
        n = len(ref_tokenizer_image_token("<image>", tok))
        return ids, [IGNORE_INDEX] * n + labels[n:], False
    sep, eos = ORIGINAL[name][4:]
    total = sum(x != tok.pad_token_id for x in ids) + (prompt.count(eos) if tok.pad_token_id == tok.eos_token_id else 0)
    with_bos = name in ("llama", "gemma")
    cur = 1 if with_bos else 0
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rou in enumerate(prompt.split(eos)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if with_bos:  # eos counts 1, the round's own BOS does not count
            round_len = len(ref_tokenizer_image_token(rou, tok))
            instr_len = len(ref_tokenizer_image_token(parts[0], tok)) - 2
            if name == "llama" and i != 0 and not tok.legacy:  # LLaVA preprocess_v1, tokenizers >= 0.14
                round_len, instr_len = round_len - 1, instr_len - 1
        else:
            round_len = len(ref_tokenizer_image_token(rou, tok)) + len(tok.encode(eos))
            instr_len = len(ref_tokenizer_image_token(parts[0], tok)) - 1
        labels[cur:cur + instr_len] = [IGNORE_INDEX] * len(labels[cur:cur + instr_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    mismatch = cur < tok.model_max_length and cur != total
    if mismatch:
        labels = [IGNORE_INDEX] * len(labels)
    return ids, labels, mismatch


PARITY_CASES = [
    conv("<image>\nWhat is shown?", "A cat."),
    conv("What is shown?\n<image>", "A cat sitting on a red mat."),
    conv("Why is the sky blue?", "Because air scatters blue light more than red light."),
    conv("<image>\nWhat color is the dog?", "The dog is brown and white.", "How many cats are there?",
         "There are 3 cats on the sofa, and 12 birds in the tree.", "Is it sunny?", "Yes."),
    conv("Tell me a short story about a robot.", "Once upon a time, a small robot learned to paint.",
         "Why?", "Because.", "Is it sunny?", "No."),
    conv("<image>", "Two people are walking a dog.\nThe dog is brown."),
    conv("What are these?", "They are apples, oranges and bananas (fruit) on a wooden table; 50% $5 #1."),
    conv("Hello world!", "Hello!", "What is shown?\n<image>", "A small boat on a calm lake at sunset."),
    conv("<image>\nDescribe the picture in detail.", "Two people.", system="You are a helpful assistant."),
    conv("Café naïve? <image>", "Crème brûlée, 日本 and ümlauts.", "Why?", "Ünïcode."),
    conv("Is there a person in the image?\n<image>\nPlease answer yes or no.", "No", "Why?", "Yes, it is."),
    conv("What is shown?", "The quick brown fox jumps over the lazy dog.", "And?", "It's a test.",
         "What is this?", "A photo of a cat on a mat.", "More?", "A red car parked in the street."),
    conv("Why?", "\nA newline first."),
    conv("Why?", " A leading space."),
    conv("<image>\nWhy?", ""),
    # the separator inside a question splits the round in 3: the original gives up ("mismatch"), we do not
    conv("Reply with 'ok ASSISTANT: ok'.", "ok ASSISTANT: ok"),
]
PAIRS = [("phi", "phi"), ("llama", "llama"), ("gemma", "gemma"), ("qwen2_base", "qwen2_base"),
         ("qwen2", "qwen2_instruct"), ("phi", "qwen2_base")]


@pytest.mark.parametrize("style,name", PAIRS)
def test_parity_with_original_masking(toks, style, name):
    tok, mismatches = toks[style], []
    for c in PARITY_CASES:
        ref_ids, ref_labels, mismatch = ref_encode(name, c, tok)
        out = encode(c, name, tok, num_image_tokens=1)
        assert out["input_ids"].tolist() == ref_ids, c  # ids always agree
        if mismatch:  # the original drops the whole sample; we still learn the answers
            mismatches.append(c)
            assert (out["labels"] != IGNORE_INDEX).any()
            continue
        assert out["labels"].tolist() == ref_labels, (c, show(out, tok))
    if mismatches:
        print(f"\n{style}/{name}: reference reports a tokenization mismatch (masks everything) on {mismatches}")
    assert len(mismatches) <= 2, mismatches


@pytest.mark.parametrize("style", ["phi", "llama", "gemma", "qwen2"])
def test_parity_pretrain(toks, style):
    for caption in ["A cat.", "A small boat on a calm lake at sunset.", "Two people,\nwalking.", "Café 日本",
                    "\nA cat.", "(fruit) 50%", " leading space"]:
        c = conv("<image>\nRender a clear and concise summary of the photo.", caption)
        ref_ids, ref_labels, _ = ref_encode("pretrain", c, toks[style])
        out = encode(c, "pretrain", toks[style], 1)
        assert out["input_ids"].tolist() == ref_ids and out["labels"].tolist() == ref_labels


def supervised_text(out, tok):
    return tok.decode([i for i, lab in zip(out["input_ids"].tolist(), out["labels"].tolist()) if lab != IGNORE_INDEX])


def test_llama_legacy_adjustment_depends_on_the_vocab(tmp_path):
    """Our tiny llama vocab has "USER" but not "▁USER" (like Llama-2), so LLaVA's legacy=False "-1" fits it. Give
    the vocab a "▁USER" piece and the original flags every multi-turn sample as a mismatch (dropping it), while
    the offsets-based labels stay right."""
    tok = make_tokenizer("llama", tmp_path)
    c = conv("Why?", "Yes.", "And?", "No.")
    assert not ref_encode("llama", c, tok)[2]
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    assert "USER" in vocab and "▁USER" not in vocab
    vocab["▁USER"] = max(vocab.values()) + 1
    spec["model"]["merges"].append(["▁", "USER"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = type(tok).from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens(tok("USER: Why?").input_ids)[:2] == ["<s>", "▁USER"]
    assert ref_encode("llama", c, tok)[2]  # original: "tokenization mismatch" -> whole sample ignored
    assert supervised_text(encode(c, "llama", tok, 1), tok) == "Yes.</s> No.</s>"


def test_original_flags_phi_template_on_qwen2_instruct_tokenizer(toks):
    """With pad = <|endoftext|> but eos = <|im_end|>, the original's total_len does not count the <|endoftext|>
    that the phi template writes after every answer, so every sample is a "mismatch" (README: Qwen uses phi)."""
    tok = toks["qwen2"]
    assert all(ref_encode("phi", c, tok)[2] for c in PARITY_CASES)
    assert supervised_text(encode(PARITY_CASES[0], "phi", tok, 1), tok) == " A cat.<|endoftext|>"


# ------------------------------------------------------------------------------------------------------------
# Image expansion and truncation

def test_image_expansion(toks):
    tok = toks["llama"]
    one = encode(TWO_TURNS, "llama", tok, 1)
    five = encode(TWO_TURNS, "llama", tok, 5)
    pos = one["input_ids"].tolist().index(IMAGE_TOKEN_INDEX)
    ids5 = five["input_ids"].tolist()
    assert ids5[pos:pos + 5] == [IMAGE_TOKEN_INDEX] * 5 and ids5.count(IMAGE_TOKEN_INDEX) == 5
    assert ids5[:pos] + ids5[pos + 5:] == one["input_ids"].tolist()[:pos] + one["input_ids"].tolist()[pos + 1:]
    assert (five["labels"][pos:pos + 5] == IGNORE_INDEX).all()
    assert five["labels"].tolist()[pos + 5:] == one["labels"].tolist()[pos + 1:]


def test_truncation_never_splits_an_image(toks):
    tok = toks["phi"]
    c = conv("Why?", "Because.", "What is shown?<image>", "A cat.")
    full = encode(c, "phi", tok, 10)["input_ids"].tolist()
    start = full.index(IMAGE_TOKEN_INDEX)
    for max_length in (start + 1, start + 5, start + 10):  # cuts inside the image block (or right at its end)
        out = encode(c, "phi", tok, 10, max_length=max_length)
        n = len(out["input_ids"])
        assert n <= max_length
        assert n == (start if max_length < start + 10 else start + 10)
        assert out["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) in (0, 10)
        assert (out["labels"] != IGNORE_INDEX).sum() == 3  # " Because." + eos of the first answer survives
    out = encode(c, "phi", tok, 10, max_length=len(full) - 1)  # cut inside the last answer: keep its start
    assert out["input_ids"].tolist() == full[:-1]


def test_answer_truncated_away_raises_with_id(toks, tmp_path):
    records = [{"id": "sample-42", "conversations": conv("Why is the sky blue?", "Because air scatters light.")}]
    ds = data.VLMDataset(records, toks["phi"], None, "phi", num_image_tokens=4, max_length=20)
    with pytest.raises(DataError, match=r"<records>: record 0 \(id='sample-42'\): answer truncated away at "
                                        r"max_length=20"):
        ds[0]
    with pytest.raises(DataError, match="answer truncated away"):
        encode(records[0]["conversations"], "phi", toks["phi"], 4, max_length=len(BYTE_SYS))


# ------------------------------------------------------------------------------------------------------------
# Records

GOOD = {"id": "ok", "image": "a.png", "conversations": conv("<image>\nWhat?", "A cat.")}
BAD = [
    ({"id": "c0"}, "missing or non-list 'conversations'"),
    ({"id": "c1", "conversations": []}, "empty conversations"),
    ({"id": "c2", "conversations": [{"from": "human", "value": "Hi"}]}, "must end with a gpt turn"),
    ({"id": "c3", "conversations": conv("Hi", "Yo", "Ho")}, "must end with a gpt turn"),
    ({"id": "c4", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "turn 1 is from 'human', expected 'gpt'"),
    ({"id": "c5", "image": "a.png", "conversations": conv("What?", "A cat.")}, "has 'image' but no <image>"),
    ({"id": "c6", "conversations": conv("<image>\nWhat?", "A cat.")}, "has <image> in its text but no 'image'"),
    ({"id": "c7", "image": "a.png", "conversations": conv("<image><image>", "A.")}, "2 <image> placeholders"),
    ({"id": "c8", "image": "a.png", "conversations": conv("<image>", "A.", "B?", "<image>")}, "inside a gpt turn"),
    ({"id": "c9", "conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]}, "turn 0 must be"),
    ({"id": "c10", "image": 3, "conversations": conv("<image>", "A.")}, "'image' must be a non-empty"),
    ({"id": "c11", "conversations": conv("Hi", "Yo", system="S") + [{"from": "gpt", "value": "again"}]},
     "turn 3 is from 'gpt', expected 'human'"),  # counted in the file's turns, system message included
    ("not a dict", "record is a str"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[b[1][:25] for b in BAD])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_malformed_records_raise_with_location(tmp_path, bad, message, fmt):
    path = tmp_path / f"d.{fmt}"
    recs = [GOOD, {**GOOD, "id": "ok2"}, bad]   # (the same id twice would be a duplicate-id)
    path.write_text(json.dumps(recs) if fmt == "json" else "\n".join(json.dumps(r) for r in recs) + "\n")
    rid = bad.get("id") if isinstance(bad, dict) else None
    with pytest.raises(DataError) as e:
        data.load_records(path)
    assert str(e.value).startswith(f"{path}: record 2 (id={rid!r}): ") and message in str(e.value)


def test_bad_json(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + '{"id": "x", "conversations": [\n')
    with pytest.raises(DataError, match=r"d.jsonl: record 1 \(line 3\): bad JSON line"):
        data.load_records(p)
    p = tmp_path / "d.json"
    p.write_text('[{"id": 1},')
    with pytest.raises(DataError, match=r"d.json: invalid JSON at line 1"):
        data.load_records(p)
    p.write_text("\n")
    with pytest.raises(DataError, match="d.json: no records"):
        data.load_records(p)
    p.write_text('{"id": 1}\n5\n')  # not starting with "[" -> JSONL, one object per line
    with pytest.raises(DataError, match=r"record 0 \(id=1\): missing or non-list 'conversations'"):
        data.load_records(p)


def test_load_records_roundtrip_and_system_turn(tmp_path):
    recs = [GOOD, {"id": 7, "conversations": conv("Hi?", "Yes.", system="Be brief.")}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert data.load_records(tmp_path / "a.json") == recs == data.load_records(tmp_path / "a.jsonl")


# ------------------------------------------------------------------------------------------------------------
# Images

def siglip(n=4):
    from transformers import SiglipImageProcessor
    return SiglipImageProcessor.from_dict({"size": {"height": n, "width": n}, "resample": Image.NEAREST})


def test_pad_fills_with_mean_and_centres():
    img = Image.new("RGB", (4, 2), (255, 0, 0))  # wide: pad rows above and below
    x = data.preprocess_image(img, siglip(), aspect="pad")
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    gray = (127 / 255 - 0.5) / 0.5  # int(255 * 0.5) = 127, normalised by SigLIP's mean = std = 0.5
    for row in (0, 3):
        assert torch.allclose(x[:, row], torch.full((3, 4), gray), atol=1e-6)
    assert torch.allclose(x[:, 1:3], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 2, 4))
    tall = data.preprocess_image(Image.new("RGB", (2, 4), (0, 0, 255)), siglip(), aspect="pad")
    assert torch.allclose(tall[:, :, 0], torch.full((3, 4), gray), atol=1e-6)
    assert torch.allclose(tall[2, :, 1:3], torch.ones(4, 2))


def test_pad_clip_mean_colour():
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor.from_dict({"size": {"shortest_edge": 6}, "crop_size": {"height": 6, "width": 6}})
    x = data.preprocess_image(Image.new("RGB", (6, 2), (0, 0, 0)), proc, aspect="pad")
    fill = torch.tensor([122, 116, 104]) / 255  # tuple(int(255 * m) for m in CLIP's mean)
    expect = (fill - torch.tensor(proc.image_mean)) / torch.tensor(proc.image_std)
    assert torch.allclose(x[:, 0, 0], expect.float(), atol=1e-5)


def test_square_is_processor_default():
    img = Image.new("RGB", (7, 3), (10, 200, 30))
    proc = siglip(5)
    expected = proc(images=img, return_tensors="pt").pixel_values[0]
    assert torch.equal(data.preprocess_image(img, proc, "square"), expected)
    with pytest.raises(ValueError, match="valid: square, pad"):
        data.preprocess_image(img, proc, "anyres")


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read image .*missing.png"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(DataError, match="junk.png"):
        data.load_image(tmp_path / "junk.png")
    Image.new("L", (3, 2)).save(tmp_path / "g.png")
    assert data.load_image(tmp_path / "g.png").mode == "RGB"


# ------------------------------------------------------------------------------------------------------------
# Dataset and collate

def test_dataset_and_collate(toks, tmp_path):
    Image.new("RGB", (5, 3), (255, 255, 255)).save(tmp_path / "a.png")
    Image.new("RGB", (3, 5), (0, 0, 0)).save(tmp_path / "b.png")
    records = [{"id": "t", "conversations": conv("Why?", "Yes.")},
               {"id": "i1", "image": "a.png", "conversations": conv("<image>\nWhat?", "A cat.")},
               {"id": "i2", "image": "b.png", "conversations": conv("What?<image>", "A dog.", "Why?", "No.")}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    tok = toks["phi"]
    ds = data.VLMDataset(tmp_path / "d.json", tok, siglip(), "phi", num_image_tokens=3, max_length=100,
                         image_folder=tmp_path, image_aspect_ratio="pad")
    samples = [ds[i] for i in range(len(ds))]
    assert samples[0]["pixel_values"] is None and samples[0]["id"] == "t"
    assert samples[1]["pixel_values"].shape == (3, 4, 4)
    assert [(s["input_ids"] == IMAGE_TOKEN_INDEX).sum().item() for s in samples] == [0, 3, 3]
    lengths = ds.lengths
    assert lengths[0] < 0 < lengths[1] and lengths[2] > 0

    # pad == eos for phi: the final EOS of each row must stay visible to attention
    assert tok.pad_token_id == tok.eos_token_id
    batch = collate(samples, tok.pad_token_id)
    n = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(n))
    assert batch["attention_mask"].dtype == torch.long and batch["attention_mask"].sum(1).tolist() == n
    for row, s in enumerate(samples):
        assert torch.equal(batch["input_ids"][row, :n[row]], s["input_ids"])
        assert batch["input_ids"][row, n[row] - 1] == tok.eos_token_id and batch["attention_mask"][row, n[row] - 1] == 1
        assert (batch["input_ids"][row, n[row]:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n[row]:] == IGNORE_INDEX).all()
    assert batch["images"].shape == (2, 3, 4, 4)
    assert torch.equal(batch["images"][0], samples[1]["pixel_values"])
    assert torch.equal(batch["images"][1], samples[2]["pixel_values"])

    left = collate(samples, tok.pad_token_id, padding_side="left")
    for row, s in enumerate(samples):
        assert torch.equal(left["input_ids"][row, -n[row]:], s["input_ids"])
        assert left["attention_mask"][row].tolist() == [0] * (max(n) - n[row]) + [1] * n[row]
        assert torch.equal(left["labels"][row, -n[row]:], s["labels"])
    assert collate(samples[:1], tok.pad_token_id)["images"] is None
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate(samples, None)


def test_dataset_drops_image_cut_by_truncation(toks, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    c = conv("Why?", "Because.", "What is shown?<image>", "A cat.")
    start = encode(c, "phi", toks["phi"], 8)["input_ids"].tolist().index(IMAGE_TOKEN_INDEX)
    ds = data.VLMDataset([{"id": 1, "image": "a.png", "conversations": c}], toks["phi"], siglip(), "phi",
                         num_image_tokens=8, max_length=start + 4, image_folder=tmp_path)
    sample = ds[0]
    assert sample["pixel_values"] is None and IMAGE_TOKEN_INDEX not in sample["input_ids"].tolist()


def test_dataset_checks(toks, tmp_path):
    recs = [{"id": 1, "image": "missing.png", "conversations": conv("<image>", "A.")}]
    with pytest.raises(ValueError, match="image_folder is None"):
        data.VLMDataset(recs, toks["phi"], siglip(), "phi", 4, 100)
    with pytest.raises(DataError, match=r"record 0 \(id=1\): cannot read image .*missing.png"):
        data.VLMDataset(recs, toks["phi"], siglip(), "phi", 4, 100, image_folder=tmp_path)[0]
    with pytest.raises(ValueError, match="'</s>', which this tokenizer does not know"):
        data.VLMDataset(recs, toks["phi"], siglip(), "llama", 4, 100, image_folder=tmp_path)
    with pytest.raises(DataError, match=r"<records>: record 0 \(id='x'\): empty conversations"):
        data.VLMDataset([{"id": "x", "conversations": []}], toks["phi"], None, "phi", 4, 100)


def test_tiny_tokenizers_are_deterministic(tmp_path):
    a = make_tokenizer("gemma", tmp_path / "a").get_vocab()
    assert a == make_tokenizer("gemma", tmp_path / "b").get_vocab()

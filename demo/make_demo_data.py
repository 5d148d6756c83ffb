"""Regenerate demo/ (images/, pretrain.json, finetune.json, eval/, tokenizer/, README.md) deterministically from
scikit-learn's bundled UCI handwritten digits, offline, and print the README (counts, majority baselines).

    pip install scikit-learn && python demo/make_demo_data.py   # sklearn is needed only here, once
"""
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SEED, N_EVAL, N_TRAIN, SIZE = 0, 300, 1200, 32
OUT = Path(__file__).resolve().parent
SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA's short-answer prompt
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
COLORS = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 70, 230), "yellow": (240, 200, 0)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
YN = {True: "Yes", False: "No"}  # LLaVA's training data capitalises yes/no
CAPTION_REQUESTS = ["Describe the image concisely.", "Provide a brief description of the given image.",
                    "Write a terse but informative summary of the picture.", "What is in the photo?"]
QUESTIONS = {  # question type -> (phrasings, VQA answer_type); "there" is POPE-style, answers 50/50 yes/no
    "digit": (["What digit is shown?", "Which number is written in the image?"], "number"),
    "color": (["What color is the digit?"], "other"), "background": (["What color is the background?"], "other"),
    "even": (["Is the digit even?"], "yes/no"), "gt4": (["Is the digit greater than 4?"], "yes/no"),
    "there": (["Is there a {d} in the image?"], "yes/no"),
}


def ask(qtype, s, rng, want=None):
    """(question, answer) of type `qtype` about sample `s`; `want` forces the answer of a "there" question."""
    d = s["digit"]
    if qtype == "there":
        want = rng.random() < 0.5 if want is None else want
        d = d if want else rng.choice([x for x in range(10) if x != d])
    answer = {"digit": str(d), "color": s["color"], "background": s["background"], "even": YN[d % 2 == 0],
              "gt4": YN[d > 4], "there": YN[bool(want)]}[qtype]
    return rng.choice(QUESTIONS[qtype][0]).format(d=d), answer


def render(pixels, color, background):
    """8x8 intensities 0..16 -> SIZE x SIZE image: bilinear upscale, quantised back to 17 levels, each level a blend
    of foreground over background (saved as a 17-colour palette PNG; load with .convert("RGB"))."""
    a = Image.fromarray((pixels / 16.0).astype(np.float32), mode="F").resize((SIZE, SIZE), Image.BILINEAR)
    levels = np.clip(np.asarray(a) * 16, 0, 16).round().astype(np.uint8)
    t = np.linspace(0, 1, 17)[:, None]
    palette = np.array(BACKGROUNDS[background]) * (1 - t) + np.array(COLORS[color]) * t
    im = Image.fromarray(levels, mode="P")
    im.putpalette(palette.round().astype(np.uint8).ravel().tolist())
    return im


def text_only(rng):
    a, b = rng.randrange(10), rng.randrange(10)
    return rng.choice([(f"What is {a} plus {b}?", str(a + b)), (f"Is {a} an even number?", YN[a % 2 == 0]),
                       (f"What is {max(a, b)} minus {min(a, b)}?", str(abs(a - b)))])


def turn(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def dump(path, obj, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(o) + "\n" for o in obj) if jsonl else json.dump(obj, f)


def make_tokenizer(texts, out_dir, vocab_size=2000):
    """phi-2 style: GPT-2 byte-level BPE, <|endoftext|> = bos = eos = unk = pad, saved as CodeGenTokenizer.
    BPE stops early once every word of these texts is one token (~500 tokens), whatever vocab_size asks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, CodeGenTokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"], **{"<|endoftext|>": len(model["vocab"])})
    shutil.rmtree(out_dir, ignore_errors=True)
    CodeGenTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>").save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    sample = SYSTEM + " USER: \nWhat digit is shown?" + SUFFIX + " ASSISTANT: 7<|endoftext|>"
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == sample and ids[-1] == tok.eos_token_id, "tokenizer round-trip failed"
    assert len(tok("<|endoftext|>", add_special_tokens=False)["input_ids"]) == 1 and tok.eos_token_id == len(vocab) - 1
    assert tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    return tok


def main():
    rng, digits = random.Random(SEED), load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    eval_idx, train_idx = sorted(order[:N_EVAL].tolist()), sorted(order[N_EVAL:N_EVAL + N_TRAIN].tolist())
    shutil.rmtree(OUT / "images", ignore_errors=True)
    (OUT / "images").mkdir()
    samples = {}
    for i in sorted(eval_idx + train_idx):  # colour and background: random per image, independent of the digit
        s = {"digit": int(digits.target[i]), "color": rng.choice(list(COLORS)),
             "background": rng.choice(list(BACKGROUNDS)), "image": f"{i:05d}.png"}
        render(digits.images[i], s["color"], s["background"]).save(OUT / "images" / s["image"], optimize=True)
        samples[i] = s

    pretrain, finetune, train_answers = [], [], {}
    for i in train_idx:
        s = samples[i]
        # The caption is the digit alone. Measured: with a from-scratch LLM, any further words ("a red handwritten
        # digit 7 on a white background") let the model learn colours and never the digit in the CPU budget.
        caption = str(s["digit"])
        pretrain.append({"id": f"pt_{i:05d}", "image": s["image"],
                         "conversations": turn("<image>\n" + rng.choice(CAPTION_REQUESTS), caption)})
        conv = []  # 1-3 QA turns of distinct types; the first carries <image> (at its end ~5% of the time)
        for t, qtype in enumerate(rng.sample(list(QUESTIONS), rng.choices([1, 2, 3], [4, 4, 2])[0])):
            q, a = ask(qtype, s, rng)
            train_answers.setdefault(qtype, Counter())[a.lower()] += 1
            q += SUFFIX
            if t == 0:
                q = q + "\n<image>" if rng.random() < 0.05 else "<image>\n" + q
            conv += turn(q, a)
        finetune.append({"id": f"ft_{i:05d}", "image": s["image"], "conversations": conv})
    for k in range(round(len(finetune) / 9)):  # ~10% of all finetune records are text-only (no "image" key)
        q, a = text_only(rng)
        finetune.append({"id": f"text_{k:04d}", "conversations": turn(q + SUFFIX, a)})
    rng.shuffle(finetune)
    dump(OUT / "pretrain.json", pretrain)
    dump(OUT / "finetune.json", finetune)

    # held-out VQAv2-style: per image one digit question + one attribute question; GT answers lowercase as in VQA
    vqa_q, official_q, anns, qtypes = [], [], [], []
    for i in eval_idx:
        for k, qtype in enumerate(["digit", rng.choice(["color", "background", "even", "gt4"])]):
            q, a = ask(qtype, samples[i], rng)
            qid, a = i * 10 + k, a.lower()
            vqa_q.append({"question_id": qid, "image": samples[i]["image"], "text": q + SUFFIX, "category": "default"})
            official_q.append({"question_id": qid, "image_id": i, "question": q})
            anns.append({"question_id": qid, "image_id": i, "question_type": " ".join(q.lower().split()[:3]),
                         "answer_type": QUESTIONS[qtype][1], "multiple_choice_answer": a,
                         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)]})
            qtypes.append(qtype)
    meta = {"info": {"description": "tinyllava-nano demo: UCI handwritten digits via scikit-learn"},
            "license": {"name": "BSD-3-Clause"}, "data_type": "demo_digits", "data_subtype": "val"}
    dump(OUT / "eval/vqav2/llava_vqav2_demo_val.jsonl", vqa_q, jsonl=True)
    dump(OUT / "eval/vqav2/demo_val_questions.json", dict(meta, task_type="Open-Ended", questions=official_q))
    dump(OUT / "eval/vqav2/demo_val_annotations.json", dict(meta, annotations=anns))

    # held-out POPE-style: one "Is there a D in the image?" per image, exactly 50/50 yes/no; labels in question order
    wants = rng.sample([True, False] * (N_EVAL // 2), N_EVAL)
    pope_q, pope_l = [], []
    for qid, (i, want) in enumerate(zip(eval_idx, wants), 1):
        q, a = ask("there", samples[i], rng, want)
        pope_q.append({"question_id": qid, "image": samples[i]["image"], "text": q + SUFFIX, "category": "random"})
        pope_l.append({"question_id": qid, "image": samples[i]["image"], "text": q, "label": a.lower()})
    dump(OUT / "eval/pope/llava_pope_test.jsonl", pope_q, jsonl=True)
    dump(OUT / "eval/pope/coco/coco_pope_random.json", pope_l, jsonl=True)

    # majority baselines: the most frequent TRAINING answer of each question type, scored on the held-out set
    gt = [a["multiple_choice_answer"] for a in anns]
    maj = {qt: c.most_common(1)[0][0] for qt, c in train_answers.items()}
    top = sum(train_answers.values(), Counter()).most_common(1)[0][0]
    rows = [(f"VQAv2-style `{qt}`, always {maj[qt]}", [(g, maj[qt]) for g, t in zip(gt, qtypes) if t == qt])
            for qt in ["digit", "color", "background", "even", "gt4"]]
    rows += [("VQAv2-style overall, per-type majority", [(g, maj[t]) for g, t in zip(gt, qtypes)]),
             (f"VQAv2-style overall, always {top}", [(g, top) for g in gt]),
             ("POPE-style random, always yes", [(p["label"], "yes") for p in pope_l])]
    table = [f"| {name} | {len(r)} | {100 * sum(g == p for g, p in r) / len(r):.1f}% |" for name, r in rows]

    texts = [SYSTEM, "USER:", "ASSISTANT:"] + [  # what the demo LLM reads, rendered roughly as data.py does
        SYSTEM + " " + " ".join(f"USER: {h['value'].replace('<image>', '')} ASSISTANT: {g['value']}"
                                for h, g in zip(r["conversations"][::2], r["conversations"][1::2]))
        for r in finetune + pretrain] + [q["text"] for q in vqa_q + pope_q]
    tok = make_tokenizer(texts, OUT / "tokenizer")
    answers = sorted({g["value"] for r in finetune for g in r["conversations"][1::2]}, key=lambda a: (len(a), a))
    n_qa = sum(len(r["conversations"]) // 2 for r in finetune)
    readme = f"""# Demo data (`make_demo_data.py`, seed {SEED})

{len(samples)} of the 1797 UCI handwritten digits bundled with scikit-learn (`load_digits`, BSD-3-Clause; UCI "Optical
Recognition of Handwritten Digits", Alpaydin & Kaynak 1998), 8x8 scans upscaled (bilinear) to {SIZE}x{SIZE} palette
PNGs `images/<sklearn index>.png` (open with `.convert("RGB")`), digit in red/green/blue/yellow on white or black.
- `pretrain.json`: {len(pretrain)} captions, one per training image: the digit alone ("7"; longer captions let a
  from-scratch model learn the colours and never the digit on a CPU budget, measured).
- `finetune.json`: {len(finetune)} records, {n_qa} QA turns (digit, colour, background, even?, greater than 4?, "Is
  there a D in the image?"; 1-3 per image; ~5% `<image>` last; {len(finetune) - len(train_idx)} text-only sums);
  {len(answers)} distinct answers: {" ".join(answers)}.
- `eval/`: {N_EVAL} held-out images, laid out as LLaVA's eval folders: `vqav2/llava_vqav2_demo_val.jsonl` ({len(vqa_q)})
  + official-format `vqav2/demo_val_annotations.json` and `vqav2/demo_val_questions.json`;
  `pope/llava_pope_test.jsonl` ({len(pope_q)}) + `pope/coco/coco_pope_random.json`.
- `tokenizer/`: phi-2 style byte-level BPE, {len(tok)} tokens, `<|endoftext|>` = bos/eos/unk/pad (template "phi").

Majority baselines (most frequent training answer of the question type) | n | held-out accuracy
|---|---|---|
""" + "\n".join(table) + "\n\nRegenerate: `pip install scikit-learn && python demo/make_demo_data.py`\n"
    (OUT / "README.md").write_text(readme)
    print(readme)


if __name__ == "__main__":
    main()

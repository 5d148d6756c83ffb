"""Regenerate demo/ (images/, pretrain.json, finetune.json, eval/, tokenizer/, README.md) deterministically from
scikit-learn's bundled UCI handwritten digits, offline, and print the README (counts, majority baselines).

    pip install scikit-learn && python demo/make_demo_data.py   # sklearn is needed only here, once
    python demo/make_demo_data.py --out /tmp/d --caption digit  # a variant, elsewhere (for experiments)
"""
import argparse
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

SEED, N_EVAL, SIZE = 0, 300, 32
OUT = Path(__file__).resolve().parent
SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA's short-answer prompt
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
COLORS = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 70, 230), "yellow": (240, 200, 0)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
YN = {True: "Yes", False: "No"}  # LLaVA's training data capitalises yes/no
CAPTION_REQUESTS = ["Describe the image concisely.", "Provide a brief description of the given image.",
                    "Write a terse but informative summary of the picture.", "What is in the photo?"]
# question type -> (phrasings, VQA answer_type). The first phrasing of each type is the one the evaluation asks
# (digit: the first two); training uses all of them. "there" is POPE-style: compare the question with the image.
QUESTIONS = {
    "digit": (["What digit is shown?", "Which number is written in the image?", "What number is this?",
               "Which digit is in the picture?"], "number"),
    "color": (["What color is the digit?", "What color is the number?", "Which color is the digit written in?"],
              "other"),
    "background": (["What color is the background?", "Which color is the background?",
                    "What is the background color?"], "other"),
    "even": (["Is the digit even?", "Is the number even?", "Is this an even number?"], "yes/no"),
    "gt4": (["Is the digit greater than 4?", "Is the number larger than 4?", "Is the digit more than 4?"], "yes/no"),
    "there": (["Is there a {d} in the image?", "Is the digit a {d}?", "Does the image show a {d}?"], "yes/no"),
}
# two images (issue 26): records added after all the others from their own seeded stream, so every earlier record,
# image and the tokenizer (trained on the others' text) stay byte for byte as they were
PAIR_QUESTIONS = ["Are these the same digit?", "Do the two images show the same digit?",
                  "Is it the same digit in both images?"]
N_PAIRS = 1500
# detail (issue 28): a CANVAS x CANVAS image of small digits (the 8x8 scan at DETAIL px, its own resolution), each
# in a quadrant, centred in a random one of the quadrant's four 16-px patches: at max_tiles=4 the canvas is a 2x2 grid
# of 32-px tiles that show each digit at DETAIL px, while the global view (the canvas resized to 32 px) halves it.
# PER_CANVAS 1: one digit in a random quadrant, asked as the `digit` type is ("What digit is shown?"); 4: one per
# quadrant, every quadrant asked ("What digit is in the top left?"). Pretrain: N_SMALL 32-px images of one small digit
# placed as in a tile (every training digit once: 700 drawn at random, ~560 distinct, left `detail` at 83-87 held
# out), captioned as the others (the tower is trained only there); finetune: N_CANVAS canvases, one
# conversation each; held out: the 300 held-out scans, each once. Appended after all the others from their own
# seeded stream: every earlier record, image and the tokenizer stay byte for byte.
CANVAS, DETAIL, N_SMALL, N_CANVAS, PER_CANVAS = 64, 8, 1497, 300, 1
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]   # row by row, as the tiles
DETAIL_QUESTIONS = {1: [q + "{q}" for q in QUESTIONS["digit"][0]],   # {q}: the quadrant (4), nothing (1)
                    4: ["What digit is in the {q}?", "Which number is in the {q}?", "What is the digit in the {q}?"]}
EVAL_PHRASINGS = {"digit": 2}  # how many of the first phrasings the evaluation draws from (default 1)
VQA_TYPES = ["digit", "color", "background", "even", "gt4"]   # the VQAv2-style evaluation; "there" is POPE's
KEEP = "\n## "   # README.md from its first section heading on is hand-written: kept when regenerating


def ask(qtype, s, rng, want=None, phrasings=None):
    """(question, answer) of type `qtype` about sample `s`; `want` forces the answer of a "there" question."""
    d = s["digit"]
    if qtype == "there":
        want = rng.random() < 0.5 if want is None else want
        d = d if want else rng.choice([x for x in range(10) if x != d])
    answer = {"digit": str(d), "color": s["color"], "background": s["background"], "even": YN[d % 2 == 0],
              "gt4": YN[d > 4], "there": YN[bool(want)]}[qtype]
    texts = QUESTIONS[qtype][0][:phrasings]
    return rng.choice(texts).format(d=d), answer


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


def small_digit(pixels, rng, levels=None, top=0, left=0):
    """Draws the 8x8 scan at DETAIL px (levels 0..16, as render) into `levels` (a new 32x32 if None), centred in
    a random one of the four 16-px patches of the 32x32 square at (top, left); returns `levels`."""
    levels = np.zeros((SIZE, SIZE), np.uint8) if levels is None else levels
    a = Image.fromarray((pixels / 16.0).astype(np.float32), mode="F").resize((DETAIL, DETAIL), Image.BILINEAR)
    y, x = (top + 16 * rng.randrange(2) + (16 - DETAIL) // 2, left + 16 * rng.randrange(2) + (16 - DETAIL) // 2)
    levels[y:y + DETAIL, x:x + DETAIL] = np.clip(np.asarray(a) * 16, 0, 16).round().astype(np.uint8)
    return levels


def paint(levels, color, background):
    """Levels 0..16 -> a 17-colour palette image, each level a blend of `color` over `background` (as render)."""
    t = np.linspace(0, 1, 17)[:, None]
    palette = np.array(BACKGROUNDS[background]) * (1 - t) + np.array(COLORS[color]) * t
    im = Image.fromarray(levels, mode="P")
    im.putpalette(palette.round().astype(np.uint8).ravel().tolist())
    return im


def canvases(samples, n, per, rng, images, folder, name):
    """n canvases of `per` samples each (`samples` n x per long: in order; else drawn at random), in quadrants drawn
    at random (all four for per 4), saved as folder/<name><k>.png; yields (image name, [(quadrant, sample)])."""
    for k in range(n):
        some = samples[per * k:per * k + per] if len(samples) == per * n else [rng.choice(samples) for _ in range(per)]
        placed = list(zip(rng.sample(range(4), per) if per < 4 else range(4), some))
        levels = np.zeros((CANVAS, CANVAS), np.uint8)
        for q, s in placed:
            small_digit(images[s["index"]], rng, levels, top=SIZE * (q // 2), left=SIZE * (q % 2))
        image = f"{name}{k:04d}.png"
        paint(levels, rng.choice(list(COLORS)), rng.choice(list(BACKGROUNDS))).save(folder / image, optimize=True)
        yield image, placed


def where(q, per):   # the quadrant as a question says it (" top left"), or nothing when the canvas has one digit
    return QUADRANTS[q] if per > 1 else ""


def text_only(rng):
    a, b = rng.randrange(10), rng.randrange(10)
    return rng.choice([(f"What is {a} plus {b}?", str(a + b)), (f"Is {a} an even number?", YN[a % 2 == 0]),
                       (f"What is {max(a, b)} minus {min(a, b)}?", str(abs(a - b)))])


def pairs(samples, n, rng, phrasings=None):
    """n (first, second, question, answer) "same digit?" questions, half yes, half no (k even: the same digit)."""
    for k in range(n):
        a = rng.choice(samples)
        b = rng.choice([s for s in samples if (s["digit"] == a["digit"]) == (k % 2 == 0) and s is not a])
        yield a, b, rng.choice(PAIR_QUESTIONS[:phrasings]), YN[k % 2 == 0]


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


def conversations(s, rng, layout):
    """The finetune question types about sample `s`, grouped into conversations. "pairs" (the demo's): one
    digit-dependent question per conversation (digit, even, gt4, there: any of them gives the others away), each
    with a colour or a background question, which give nothing away. "all": the six in one conversation; "single":
    one question per conversation."""
    if layout == "pairs":
        free = ["color", "background"] * 2
        rng.shuffle(free)
        return [rng.sample([d, f], 2) for d, f in zip(["digit", "even", "gt4", "there"], free)]
    qtypes = rng.sample(list(QUESTIONS), len(QUESTIONS))
    return [qtypes] if layout == "all" else [[q] for q in qtypes]


def main(out=OUT, caption="first", layout="pairs"):
    from sklearn.datasets import load_digits
    out = Path(out)
    rng, digits = random.Random(SEED), load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    eval_idx = set(order[:N_EVAL].tolist())
    shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True)
    evals, trains = [], []   # colour and background: random per image, independent of the digit
    for i in range(len(digits.target)):
        s = {"digit": int(digits.target[i]), "color": rng.choice(list(COLORS)),
             "background": rng.choice(list(BACKGROUNDS)), "image": f"{i:05d}.png", "index": i}
        render(digits.images[i], s["color"], s["background"]).save(out / "images" / s["image"], optimize=True)
        (evals if i in eval_idx else trains).append(s)

    pretrain, finetune, train_answers = [], [], {}
    for s in trains:
        # the caption names the digit first: the frozen LLM's first answer position sees the image tokens alone,
        # so the tower learns the digit there; the colours after it keep the colours in the features
        text = {"first": f"{s['digit']}, {s['color']} on {s['background']}.", "digit": str(s["digit"]),
                "full": f"A {s['color']} {s['digit']} on {s['background']}."}[caption]
        pretrain.append({"id": f"pt_{s['index']:05d}", "image": s["image"],
                         "conversations": turn("<image>\n" + rng.choice(CAPTION_REQUESTS), text)})
        for r, qtypes in enumerate(conversations(s, rng, layout)):
            conv = []
            for t, qtype in enumerate(qtypes):
                q, a = ask(qtype, s, rng)
                train_answers.setdefault(qtype, Counter())[a.lower()] += 1
                q += SUFFIX
                if t == 0:   # the image goes with the first question, at its end ~5% of the time
                    q = q + "\n<image>" if rng.random() < 0.05 else "<image>\n" + q
                conv += turn(q, a)
            finetune.append({"id": f"ft_{s['index']:05d}_{r}", "image": s["image"], "conversations": conv})
    for k in range(round(len(finetune) / 20)):   # ~5% of the finetune records are text-only (no "image" key)
        q, a = text_only(rng)
        finetune.append({"id": f"text_{k:04d}", "conversations": turn(q + SUFFIX, a)})
    rng.shuffle(finetune)
    plain, prng = list(finetune), random.Random(SEED + 26)   # the tokenizer is trained on `plain` (as before)
    finetune += [{"id": f"pair_{k:04d}", "image": [a["image"], b["image"]],
                  "conversations": turn("<image>\n<image>\n" + q + SUFFIX, y)}
                 for k, (a, b, q, y) in enumerate(pairs(trains, N_PAIRS, prng))]
    # detail (issue 28): from its own stream, appended last (the tokenizer below is trained on the others' text)
    drng, small, detail = random.Random(SEED + 28), [], []
    cycle = [s for _ in range(-(-N_SMALL // len(trains))) for s in drng.sample(trains, len(trains))]
    for k in range(N_SMALL):   # every training digit once (then again), in a shuffled order
        s, color, background = cycle[k], drng.choice(list(COLORS)), drng.choice(list(BACKGROUNDS))
        image = f"small{k:04d}.png"
        paint(small_digit(digits.images[s["index"]], drng), color, background).save(out / "images" / image,
                                                                                    optimize=True)
        small.append({"id": f"small_{k:04d}", "image": image, "conversations": turn(
            "<image>\n" + drng.choice(CAPTION_REQUESTS), f"{s['digit']}, {color} on {background}.")})
    for k, (image, placed) in enumerate(canvases(trains, N_CANVAS, PER_CANVAS, drng, digits.images, out / "images",
                                                 "canvas")):
        conv = []
        for q, s in drng.sample(placed, len(placed)):   # every digit, in a random order: the answers are independent
            conv += turn(drng.choice(DETAIL_QUESTIONS[PER_CANVAS]).format(q=where(q, PER_CANVAS)) + SUFFIX,
                         str(s["digit"]))
        conv[0]["value"] = "<image>\n" + conv[0]["value"]
        detail.append({"id": f"detail_{k:04d}", "image": image, "conversations": conv})
    dump(out / "pretrain.json", pretrain + small)
    dump(out / "finetune.json", finetune + detail)

    # held-out VQAv2-style: every question type about every held-out image; GT answers lowercase as in VQA;
    # question_type is the demo's type name (VQA's is the first words of the question), so vqaEval reports per type
    vqa_q, official_q, anns = [], [], []
    for s in evals:
        for k, qtype in enumerate(VQA_TYPES):
            q, a = ask(qtype, s, rng, phrasings=EVAL_PHRASINGS.get(qtype, 1))
            qid, a = s["index"] * 10 + k, a.lower()
            vqa_q.append({"question_id": qid, "image": s["image"], "text": q + SUFFIX, "category": qtype})
            official_q.append({"question_id": qid, "image_id": s["index"], "question": q})
            anns.append({"question_id": qid, "image_id": s["index"], "question_type": qtype,
                         "answer_type": QUESTIONS[qtype][1], "multiple_choice_answer": a,
                         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)]})
    meta = {"info": {"description": "tinyllava-nano demo: UCI handwritten digits via scikit-learn"},
            "license": {"name": "BSD-3-Clause"}, "data_type": "demo_digits", "data_subtype": "val"}
    dump(out / "eval/vqav2/llava_vqav2_demo_val.jsonl", vqa_q, jsonl=True)
    dump(out / "eval/vqav2/demo_val_questions.json", dict(meta, task_type="Open-Ended", questions=official_q))
    dump(out / "eval/vqav2/demo_val_annotations.json", dict(meta, annotations=anns))

    # held-out POPE-style: two "Is there a D in the image?" per image, one yes, one no (another digit), in a
    # shuffled order; labels in question order
    asks = [(s, want) for s in evals for want in (True, False)]
    rng.shuffle(asks)
    pope_q, pope_l = [], []
    for qid, (s, want) in enumerate(asks, 1):
        q, a = ask("there", s, rng, want, phrasings=1)
        pope_q.append({"question_id": qid, "image": s["image"], "text": q + SUFFIX, "category": "random"})
        pope_l.append({"question_id": qid, "image": s["image"], "text": q, "label": a.lower()})
    dump(out / "eval/pope/llava_pope_test.jsonl", pope_q, jsonl=True)
    # held-out two-image questions (evaluate.py --bench custom: an image list per question, references per line)
    pair_q = [(f"pair_{k:03d}", a, b, q, y) for k, (a, b, q, y) in enumerate(pairs(evals, N_EVAL, prng, 1))]
    dump(out / "eval/pairs/questions.jsonl", [{"question_id": i, "image": [a["image"], b["image"]], "text": q + SUFFIX,
                                               "category": "same"} for i, a, b, q, y in pair_q], jsonl=True)
    dump(out / "eval/pairs/answers.jsonl", [{"question_id": i, "answers": [y.lower()]} for i, *_, y in pair_q],
         jsonl=True)
    dump(out / "eval/pope/coco/coco_pope_random.json", pope_l, jsonl=True)
    # held-out detail: the held-out scans in a shuffled order, each once, every digit asked
    held, ask_detail = drng.sample(evals, len(evals)), DETAIL_QUESTIONS[PER_CANVAS][0]
    detail_q = [(image, ask_detail.format(q=where(q, PER_CANVAS)), str(s["digit"]))
                for image, placed in canvases(held, len(held) // PER_CANVAS, PER_CANVAS, drng, digits.images,
                                              out / "images", "canvas_eval")
                for q, s in placed]
    detail_q = [(f"detail_{k:03d}", *x) for k, x in enumerate(detail_q)]
    dump(out / "eval/detail/questions.jsonl", [{"question_id": i, "image": im, "text": q + SUFFIX,
                                                "category": "detail"} for i, im, q, a in detail_q], jsonl=True)
    dump(out / "eval/detail/answers.jsonl", [{"question_id": i, "answers": [a]} for i, *_, a in detail_q], jsonl=True)

    # what a model that learned nothing about the images scores: the most frequent TRAINING answer of each type
    # (what it would learn to say), and the best constant answer of the type on the held-out questions
    maj = {qt: c.most_common(1)[0][0] for qt, c in train_answers.items()}
    rows = []
    for qt in VQA_TYPES:
        gt = [a["multiple_choice_answer"] for a in anns if a["question_type"] == qt]
        best = Counter(gt).most_common(1)[0]
        rows.append(f"| `{qt}` | {len(gt)} | {100 * gt.count(maj[qt]) / len(gt):.1f} ({maj[qt]}) | "
                    f"{100 * best[1] / len(gt):.1f} ({best[0]}) |")
    rows.append(f"| POPE-style (accuracy; F1 of always yes: 66.7) | {len(pope_l)} | 50.0 | 50.0 |")
    rows.append(f"| `same` (two images: \"{PAIR_QUESTIONS[0]}\") | {len(pair_q)} | 50.0 (yes) | 50.0 (yes) |")
    gt, train_gt = [a for *_, a in detail_q], [g["value"] for r in detail for g in r["conversations"][1::2]]
    common, best = Counter(train_gt).most_common(1)[0][0], Counter(gt).most_common(1)[0]
    rows.append(f"| `detail` (\"{detail_q[0][2]}\" of a {CANVAS}x{CANVAS} canvas) | "
                f"{len(gt)} | {100 * gt.count(common) / len(gt):.1f} ({common}) | "
                f"{100 * best[1] / len(gt):.1f} ({best[0]}) |")

    texts = [SYSTEM, "USER:", "ASSISTANT:"] + [  # what the demo LLM reads, rendered roughly as data.py does
        SYSTEM + " " + " ".join(f"USER: {h['value'].replace('<image>', '')} ASSISTANT: {g['value']}"
                                for h, g in zip(r["conversations"][::2], r["conversations"][1::2]))
        for r in plain + pretrain] + [q["text"] for q in vqa_q + pope_q]
    tok = make_tokenizer(texts, out / "tokenizer")
    answers = sorted({g["value"] for r in plain for g in r["conversations"][1::2]}, key=lambda a: (len(a), a))
    n_qa = {qt: sum(c.values()) for qt, c in sorted(train_answers.items())}
    readme = f"""# Demo data (`make_demo_data.py`, seed {SEED})

All {len(digits.target)} UCI handwritten digits bundled with scikit-learn (`load_digits`, BSD-3-Clause; UCI "Optical
Recognition of Handwritten Digits", Alpaydin & Kaynak 1998), 8x8 scans upscaled (bilinear) to {SIZE}x{SIZE} palette
PNGs `images/<sklearn index>.png` (open with `.convert("RGB")`), the digit in red/green/blue/yellow on white or
black (drawn at random per image). {N_EVAL} images are held out for evaluation, {len(trains)} are for training.
- `pretrain.json`: {len(pretrain)} captions, one per training image, the digit first: "{pretrain[0]['conversations'][1]['value']}"; then
  {N_SMALL} `images/small<k>.png`: one training digit drawn small ({DETAIL}x{DETAIL} px, the scan's own resolution) in one of
  the four 16-px patches of a {SIZE}x{SIZE} image, as in a tile of the `detail` canvases, captioned the same way.
- `finetune.json`: {len(finetune)} records, {sum(n_qa.values())} question-answer turns: per training image every question type
  ({", ".join(f"{k} {v}" for k, v in n_qa.items())}), in {layout} conversations
  (one of digit / even / greater than 4 / "Is there a D?" each, with a colour or background question; ~5% with
  `<image>` after the question); {len(finetune) - sum(1 for r in finetune if r.get("image"))} text-only sums; {N_PAIRS} two-image
  "same digit?" questions (half yes; appended last, from their own seeded stream); questions in 3-4 phrasings per type, the
  evaluation's among them; {len(answers)} distinct answers:
  {" ".join(answers)}.
  Then {N_CANVAS} `detail` records (issue 28; appended last, from their own seeded stream), one per `images/canvas<k>.png`:
  a {CANVAS}x{CANVAS} canvas with {"a training digit in each quadrant" if PER_CANVAS > 1 else "one training digit in a random quadrant"}, drawn as in `small<k>.png`,
  asked "{detail_q[0][2]}" ({len(DETAIL_QUESTIONS[PER_CANVAS])} phrasings{", every quadrant" if PER_CANVAS > 1 else ", the digit type's"}). At `max_tiles=4`
  the canvas is a 2x2 grid of {SIZE}-px tiles, the digit {DETAIL} px in its tile; the global view (the canvas at {SIZE} px)
  shows it at {DETAIL // 2} px.
- `eval/`: the {N_EVAL} held-out images (never trained on), laid out as LLaVA's eval folders:
  `vqav2/llava_vqav2_demo_val.jsonl` ({len(vqa_q)} questions: every type about every image) + official-format
  `vqav2/demo_val_annotations.json` (`question_type` is the demo's type: vqaEval reports accuracy per type) and
  `vqav2/demo_val_questions.json`; `pope/llava_pope_test.jsonl` ({len(pope_q)} "Is there a D in the image?": per image one
  yes and one no) + `pope/coco/coco_pope_random.json`; `pairs/questions.jsonl` ({len(pair_q)} two-image "{PAIR_QUESTIONS[0]}",
  half yes) + `pairs/answers.jsonl`; `detail/questions.jsonl` ({len(detail_q)} "{detail_q[0][2]}" about
  {len(detail_q) // PER_CANVAS} canvases `images/canvas_eval<k>.png`, each held-out digit on one) + `detail/answers.jsonl`.
- `tokenizer/`: phi-2 style byte-level BPE, {len(tok)} tokens, `<|endoftext|>` = bos/eos/unk/pad (template "phi").

What a model that learned nothing about the images scores (held-out accuracy, %):

| question type | n | the most frequent training answer | the best constant answer |
|---|---|---|---|
""" + "\n".join(rows) + "\n\nRegenerate: `pip install scikit-learn && python demo/make_demo_data.py`\n"
    old = (out / "README.md").read_text() if (out / "README.md").is_file() else ""
    (out / "README.md").write_text(readme + (old[old.index(KEEP):] if KEEP in old else ""))
    print(readme)
    return trains, evals


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT), help="output folder")
    p.add_argument("--caption", default="first", choices=["first", "digit", "full"],
                   help='pretrain captions: "7, red on black." | "7" | "A red 7 on black."')
    p.add_argument("--layout", default="pairs", choices=["pairs", "all", "single"],
                   help="finetune conversations (see conversations())")
    a = p.parse_args()
    main(a.out, a.caption, a.layout)

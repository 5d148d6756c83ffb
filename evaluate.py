"""
Evaluate a model on the 8 benchmarks of TinyLLaVA Factory: batched answers in LLaVA's answer-file format, then
the official metrics from scorers.py (pure functions, tested quirk by quirk against the official scorers).

    python evaluate.py --model out/phi2_siglip_base/2_finetune --bench gqa --data ~/llava_eval/gqa
    python evaluate.py --model DIR --bench vqav2,gqa,scienceqa,textvqa,pope,mme,mmvet,mmmu --data ~/llava_eval
    python evaluate.py --model DIR --bench pope --data ~/llava_eval --limit 200 --batch-size 32

--data is one benchmark's folder or the root holding them all, laid out as LLaVA-1.5's eval.zip unpacks
(playground/data/eval; the file names are in BENCHES, the download steps in the README). The prompt is the
model's training template (<model>/train_config.json, or --template) around "<image>\\n" + the question file's
text, which already carries the benchmark's suffix; ScienceQA gets LLaVA's --single-pred-prompt suffix appended.
Decoding is greedy by default (--temperature > 0 samples), batched with left padding and the KV cache, and
stops at EOS. Answers are appended to <out>/<bench>_answers.jsonl as they are produced; running the same
command again skips the questions already answered, so an interrupted run resumes where it stopped.

Answers are reused only with the settings that made them, recorded in <out>/<bench>_answers.settings.json:
model folder, a fingerprint of its files (path, size, mtime of each weight, config and tokenizer file),
template, max_new_tokens, temperature, top_p (when sampling), num_beams, image folder (not the batch size:
batched answers equal one-by-one answers). An answer file made with other settings, or without a settings file
(an older evaluate.py, another tool), is renamed aside to <name>.<time>.old, with a line naming what changed,
and the questions are answered afresh. --keep-answers keeps and scores it as it is (e.g. answers from LLaVA's
scripts), answering only the questions it lacks; its settings file then names the earlier settings
("earlier_answers", null: unknown), so a later run without the flag sets the mixed file aside.

<out>/<bench>_results.json holds the model, benchmark, split, count, seconds, the answers' settings and every
metric; a table of the headline numbers is printed. The questions asked (all, the first --limit N, or a
--questions file) are scored against their own ground truth only. The official scorers cannot score a subset
(vqaEval and GQA's eval.py stop at a question without an answer, ScienceQA's counts it wrong): this is their
number for a ground-truth file of just those questions, and the table says "n of N questions". POPE's labels
pair by position: its subset is the first N of each split (--limit), or --annotations labels exactly the
questions asked.

MM-Vet --judge-url: https:// only (--judge-allow-http: a judge on this machine); a redirect is an error, never
followed with the key; each grade is cached in <out>/mmvet_grades.json by question, ground truth, answer, judge
model and run, so no re-run sends a graded answer again (a --limit re-run adds to it).
"""
import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from collections import Counter

import scorers as S

SQA_SUFFIX = "Answer with the option's letter from the given choices directly."  # --single-pred-prompt
BENCHES = {  # folder under the eval root, question file and image folder inside it, max_new_tokens, split
    "vqav2": dict(dir="vqav2", questions="llava_vqav2_mscoco_test-dev2015.jsonl", images="test2015", tokens=128,
                  split="test-dev2015"),
    "gqa": dict(dir="gqa", questions="llava_gqa_testdev_balanced.jsonl", images="data/images", tokens=128,
                split="testdev_balanced"),
    "scienceqa": dict(dir="scienceqa", questions="llava_test_CQM-A.json", images="images/test", tokens=1024,
                      split="test"),
    "textvqa": dict(dir="textvqa", questions="llava_textvqa_val_v051_ocr.jsonl", images="train_images", tokens=128,
                    split="val"),
    "pope": dict(dir="pope", questions="llava_pope_test.jsonl", images="val2014", tokens=128, split="test"),
    "mme": dict(dir="MME", questions="llava_mme.jsonl", images="MME_Benchmark_release_version", tokens=128,
                split="all"),
    "mmvet": dict(dir="mm-vet", questions="llava-mm-vet.jsonl", images="images", tokens=1024, split="v1"),
    "mmmu": dict(dir="MMMU", questions="anns_for_eval.json", images="all_images", tokens=1024, split="validation"),
}


def read_json(path):
    """A JSON file, or JSON lines (.jsonl, and POPE's coco_pope_*.json, which are JSON lines named .json)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found (the README's benchmark table says where it comes from)") from None
    if not path.endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):
                raise ValueError(f"{path}: not valid JSON: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON: {e}") from None
    return rows


# ------------------------------------------------------------------------------------ questions, per benchmark
def load_questions(bench, path):
    """The question file -> items {question_id, text (the model's question, no image token), image (or None),
    prompt (what LLaVA's script saves in the answer row), category, answer (preset: not generated)}."""
    rows = read_json(path)
    items = []
    for i, q in enumerate(rows):
        try:
            if bench == "scienceqa":   # model_vqa_science: LLaVA conversation records; saved prompt has <image>
                text = q["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + SQA_SUFFIX
                item = dict(question_id=q["id"], text=text, image=q.get("image"),
                            prompt=("<image>\n" if q.get("image") else "") + text)
            elif bench == "mmmu":      # model_vqa_mmmu: questions without one "image" have several: not run
                item = dict(question_id=q["id"], text=q["prompt"], image=q.get("image"), prompt=q["prompt"])
                if not q.get("image"):
                    item["answer"] = S.mmmu_multi_image_answer(q)
            else:                      # model_vqa_loader / model_vqa: the saved prompt is the file's text
                item = dict(question_id=q["question_id"], text=q["text"], image=q.get("image"), prompt=q["text"],
                            category=q.get("category"))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: record {i} is not a {bench} question ({type(e).__name__}: {e}): "
                             f"{json.dumps(q)[:200]}") from None
        items.append(item)
    seen = set()
    for it in items:   # MME has two questions per question_id (the image): rows are keyed by id and prompt
        if key(it) in seen:
            raise ValueError(f"{path}: question_id {it['question_id']!r} with prompt {it['prompt'][:60]!r} appears "
                             "more than once; answers are keyed by both")
        seen.add(key(it))
    return items


def key(row):
    return str(row["question_id"]), row["prompt"]


# --------------------------------------------------------------- answers are reused only with their settings
def write_json(path, obj):
    """Written to a temporary file, then renamed over: a killed run leaves the old file or the new, never half."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(f"{path}.tmp", path)


def fingerprint(model_dir, out_dir):
    """Path, size and mtime of every weight, config and tokenizer file in the model folder: retraining or
    replacing the model changes it. The answers' folders (out_dir, <model>/eval) are not the model's."""
    h, skip = hashlib.sha256(), {os.path.abspath(out_dir), os.path.abspath(os.path.join(model_dir, "eval"))}
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) not in skip)
        for name in sorted(f for f in files if f.endswith((".safetensors", ".bin", ".json", ".model", ".txt"))):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(root, model_dir)}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def check_answers(answers_file, settings, keep=False):
    """Keep the answers on file only if `settings` made them, else rename them aside (module docstring); with
    keep, keep them whatever made them. Writes and returns the settings the answer file stands for."""
    side = answers_file[:-len(".jsonl")] + ".settings.json"
    old = read_json(side) if os.path.isfile(side) else None
    if os.path.isfile(answers_file) and old != settings:
        if keep:   # recorded, so a later run without --keep-answers sets the mixed file aside
            base = {k: v for k, v in (old or {}).items() if k != "earlier_answers"}
            settings = old if base == settings else {**settings, "earlier_answers": old}
        else:
            stamp = now = time.strftime("%Y%m%d-%H%M%S")
            n = 0
            while os.path.exists(f"{answers_file}.{stamp}.old"):   # two runs in one second keep both
                n += 1
                stamp = f"{now}-{n}"
            for f in (answers_file, side):
                if os.path.isfile(f):
                    os.replace(f, f"{f}.{stamp}.old")
            if old is None:
                why = "no settings file: an older evaluate.py or another tool made it; --keep-answers keeps it"
            else:
                why = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
                why = why or "it holds answers kept by --keep-answers"
            print(f"{answers_file}: made with other settings ({why}); moved aside to {answers_file}.{stamp}.old")
    write_json(side, settings)
    return settings


# ---------------------------------------------------------------------------- answering (batched generation)
def answer(model, tokenizer, processor, items, image_folder, template, answers_file, batch_size=16,
           max_new_tokens=128, model_id="tinyllava-nano", **generate_kwargs):
    """Answers in LLaVA's answer-file format, in question order (POPE's and MME's official scorers read it in
    order), appended and flushed every 8 batches; items already in answers_file are skipped, so an interrupted run
    resumes. Batched: left padding, KV cache, and inside each 8-batch window the questions are grouped by prompt
    length so a batch pads little; greedy unless generate_kwargs say otherwise. Returns the rows in item order."""
    import torch
    from data import collate, encode, load_image, preprocess_image
    done = set()
    if os.path.isfile(answers_file):
        with open(answers_file, "rb+") as f:  # a run killed mid-write leaves a partial last line: drop it
            text = f.read()
            if text and not text.endswith(b"\n"):
                f.truncate(text.rfind(b"\n") + 1)
        done = {key(r) for r in read_json(answers_file)}
    todo = [it for it in items if key(it) not in done]
    generate_kwargs = {"do_sample": False, "num_beams": 1, **generate_kwargs}
    model.eval()

    def row(it, text):
        return {"question_id": it["question_id"], "prompt": it["prompt"], "text": text,
                "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}

    with open(answers_file, "a") as out:
        window = batch_size * 8   # sorted by prompt length inside a window (less left padding), written in order
        for w in range(0, len(todo), window):
            part = todo[w:w + window]
            texts = {j: it["answer"] for j, it in enumerate(part) if "answer" in it}   # fixed by the benchmark
            prompts = {j: ("<image>\n" if it["image"] else "") + it["text"]
                       for j, it in enumerate(part) if j not in texts}
            encoded = {j: encode([{"from": "human", "value": text}], template, tokenizer, model.num_image_tokens,
                                 for_generation=True) for j, text in prompts.items()}
            order = sorted(encoded, key=lambda j: len(encoded[j]["input_ids"]))
            for i in range(0, len(order), batch_size):
                chunk = order[i:i + batch_size]
                for j in chunk:
                    encoded[j]["pixel_values"] = None if not part[j]["image"] else preprocess_image(
                        load_image(os.path.join(image_folder, part[j]["image"])), processor,
                        model.args.image_aspect_ratio)
                batch = collate([encoded[j] for j in chunk], tokenizer.pad_token_id, padding_side="left")
                with torch.no_grad():
                    new = model.generate(batch["input_ids"], batch["attention_mask"], images=batch["images"],
                                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                         **generate_kwargs)
                for j, ids in zip(chunk, new):
                    texts[j] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    encoded[j]["pixel_values"] = None   # a window holds its images only while they are in use
            out.write("".join(json.dumps(row(it, texts[j])) + "\n" for j, it in enumerate(part)))
            out.flush()
    rows = {key(r): r for r in read_json(answers_file)}
    return [rows[key(it)] for it in items if key(it) in rows]


# ------------------------------------------------------------------------- scoring from the native files
def mme_task_lines(answers, gt_folder):
    """(lines, number of ground-truth questions). LLaVA's convert_answer_to_mme.py: per task, lines
    'file<TAB>question<TAB>gt<TAB>prediction' in answer order; the ground truth comes from
    MME_Benchmark_release_version/<task>/[questions_answers_YN/]*.txt. Tabs and newlines in a prediction become
    spaces (they would break calculation.py's line format)."""
    gt = {}
    for task in sorted(os.listdir(gt_folder)):
        qa = os.path.join(gt_folder, task, "questions_answers_YN")
        qa = qa if os.path.isdir(qa) else os.path.join(gt_folder, task)
        if not os.path.isdir(qa):
            continue
        for name in sorted(f for f in os.listdir(qa) if f.endswith(".txt")):
            with open(os.path.join(qa, name)) as f:
                for n, line in enumerate(f, 1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"{qa}/{name} line {n}: expected 'question<TAB>answer', got {line!r}")
                    gt[task, name, parts[0]] = parts[1]
    lines = {}
    for r in answers:
        task, name = str(r["question_id"]).split("/")[0], str(r["question_id"]).split("/")[-1].rsplit(".", 1)[0]
        prompt = r["prompt"].replace("Answer the question using a single word or phrase.", "").strip()
        if "Please answer yes or no." not in prompt:
            prompt += " Please answer yes or no."
            if (task, name + ".txt", prompt) not in gt:
                prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        if (task, name + ".txt", prompt) not in gt:
            raise ValueError(f"MME: no ground truth for {r['question_id']!r} with question {prompt!r} in {gt_folder}")
        pred = r["text"].replace("\t", " ").replace("\n", " ")
        lines.setdefault(task, []).append("\t".join([name + ".txt", prompt, gt[task, name + ".txt", prompt], pred]))
    return lines, len(gt)


def score(bench, answers, items, folder, qfile, image_folder, out_dir, a, ask=None):
    """(metrics, headline, (scored, of)) from the benchmark's native ground-truth files, cut to the questions
    asked (module docstring): `scored` of the ground truth's `of` questions (None: no ground truth read). Also
    writes the official converters' files (EvalAI upload, GQA predictions, MME task files, MM-Vet submission)."""
    asked = {str(it["question_id"]) for it in items}
    gt = lambda name: a.annotations or os.path.join(folder, name)  # noqa: E731

    def side(name, obj):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f)
    if bench == "vqav2":
        result, test_ids, size = {}, os.path.join(folder, "llava_vqav2_mscoco_test2015.jsonl"), None
        if os.path.isfile(test_ids):
            side("vqav2_upload.json", S.vqav2_submission(answers, read_json(test_ids)))
            result["upload_file"] = os.path.join(out_dir, "vqav2_upload.json")
        path = gt("v2_mscoco_val2014_annotations.json")
        if os.path.isfile(path):    # val-style annotations: score locally
            anns = read_json(path)
            anns = anns["annotations"] if isinstance(anns, dict) else anns
            mine = [x for x in anns if str(x["question_id"]) in asked]
            result.update(S.score_vqav2(answers, mine))
            result.pop("per_question")
            size = len(mine), len(anns)
        elif not result:
            raise FileNotFoundError(f"vqav2: neither {test_ids} (EvalAI upload) nor annotations {path} found")
        return result, {"accuracy": result.get("overall", "EvalAI upload")}, size
    if bench == "gqa":
        side("gqa_testdev_balanced_predictions.json",
             [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in answers])
        questions = read_json(gt("data/testdev_balanced_questions.json"))
        result = S.score_gqa(answers, {k: v for k, v in questions.items() if str(k) in asked})
        balanced = sum(bool(q.get("isBalanced")) for q in questions.values())   # only these count
        return result, {"accuracy": result["accuracy"]}, (result["n"], balanced)
    if bench == "scienceqa":
        problems, splits = read_json(gt("problems.json")), read_json(os.path.join(folder, "pid_splits.json"))
        ids = [i for i in splits["test"] if str(i) in asked]
        result = S.score_scienceqa(answers, problems, ids)
        return result, {"img_acc": result["img_acc"], "acc": result["acc"]}, (len(ids), len(splits["test"]))
    if bench == "textvqa":   # m4c scores every answer row (joined by image and question)
        anns = read_json(gt("TextVQA_0.5.1_val.json"))
        anns = anns["data"] if isinstance(anns, dict) else anns
        result = S.score_textvqa(answers, anns)
        return result, {"accuracy": result["accuracy"]}, (len(answers), len(anns))
    if bench == "pope":
        label_dir = a.annotations or os.path.join(folder, "coco")
        labels = {s: read_json(os.path.join(label_dir, f"coco_pope_{s}.json")) for s in ("adversarial", "popular",
                  "random") if os.path.isfile(os.path.join(label_dir, f"coco_pope_{s}.json"))}
        if not labels:
            raise FileNotFoundError(f"pope: no label file {label_dir}/coco_pope_<adversarial|popular|random>.json")
        category = {str(it["question_id"]): it["category"] for it in items}
        per_split = Counter(category[str(r["question_id"])] for r in answers)
        if set(per_split) - set(labels):
            raise ValueError(f"pope: no label file {label_dir}/coco_pope_<split>.json for split(s) "
                             f"{sorted(set(per_split) - set(labels))}")
        of = sum(map(len, labels.values()))
        # labels pair with answers by position: a split not asked is left out; --limit asks the first of a split
        labels = {s: v[:per_split[s]] if a.limit else v for s, v in labels.items() if per_split[s]}
        split_of = {r["question_id"]: {"category": category[str(r["question_id"])]} for r in answers}
        result = S.score_pope(answers, labels, questions=split_of)
        return result, {**{f"{s}_acc": 100 * m["accuracy"] for s, m in result["splits"].items()},
                        **{f"{s}_f1": 100 * m["f1"] for s, m in result["splits"].items()},
                        "f1_mean": 100 * result["f1_mean"]}, (sum(map(len, labels.values())), of)
    if bench == "mme":
        lines, of = mme_task_lines(answers, a.annotations or image_folder)  # the GT lives beside the images
        os.makedirs(os.path.join(out_dir, "mme_answers"), exist_ok=True)
        for task, task_lines in lines.items():  # what calculation.py --results_dir reads
            with open(os.path.join(out_dir, "mme_answers", f"{task}.txt"), "w") as f:
                f.write("".join(x + "\n" for x in task_lines))
        result = S.score_mme(lines, strict=not (a.limit or a.questions))   # a subset may lack whole tasks
        return result, {"perception": result["perception"], "cognition": result["cognition"]}, (len(answers), of)
    if bench == "mmvet":
        submission = S.mmvet_submission(answers)
        side("mmvet_submission.json", submission)
        result = {"submission_file": os.path.join(out_dir, "mmvet_submission.json")}
        if not ask:
            return result, {"total": "upload the submission (README)"}, None
        meta = read_json(gt("mm-vet.json"))
        wanted = {f"v1_{i}" for i in asked}
        mine = {k: v for k, v in meta.items() if k in wanted}
        grades = grade_mmvet(ask, mine, submission, a.judge_model, a.judge_runs,
                             os.path.join(out_dir, "mmvet_grades.json"))
        result.update(S.mmvet_scores(grades, mine))
        return result, {"total": result["total"]}, (len(mine), len(meta))
    if bench == "mmmu":   # multiple-choice text is parsed here (MMMU's parser, seeded per question: scorers.py)
        answer_dict = read_json(gt("eval/answer_dict_val.json"))   # the denominator is the answers present
        result = S.score_mmmu(answers, answer_dict, questions=read_json(qfile))
        return result, {"overall": 100 * result["overall"]["acc"]}, (len(answers), len(answer_dict))
    raise ValueError(f"unknown benchmark {bench!r}; valid: {', '.join(BENCHES)}")


GRADE_KEY = ("question_id", "question", "answer", "prediction", "judge_model", "run")


def grade_mmvet(ask, meta, submission, judge_model, runs, path):
    """{id: [score per run]}, each grade asked for once: cached in `path` under GRADE_KEY, saved after every new
    grade and never dropped (a --limit re-run adds to it), so no re-run sends a graded answer again (a paid call)."""
    cache = read_json(path) if os.path.isfile(path) else []
    cache = {tuple(g[k] for k in GRADE_KEY): g["score"] for g in (cache if isinstance(cache, list) else [])}
    grades = {}
    for qid, item in meta.items():
        for run in range(runs):
            k = (qid, item["question"], item["answer"], submission.get(qid, ""), judge_model, run)
            if k not in cache:
                cache[k] = S.mmvet_grade(ask, item["question"], item["answer"], k[3])[0]
                write_json(path, [dict(zip(GRADE_KEY, key), score=v) for key, v in cache.items()])
            grades.setdefault(qid, []).append(cache[k])
    return grades


SUBSET_NOTE = ("n of N: a subset, scored against its own questions' ground truth (what the official scorer gives "
               "for a ground-truth file of just those); not comparable with the full benchmark's number")


def table(rows):
    """A plain-text table of the headline numbers; a subset says "n of N questions", and a note how it is scored."""
    lines = [f"{'benchmark':<10} {'split':<18} {'n':>6} {'seconds':>8}  metrics"]
    for r in rows:
        metrics = "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["headline"].items())
        subset = f"  ({r['scored']} of {r['of']} questions)" if r["scored"] < r["of"] else ""
        lines.append(f"{r['bench']:<10} {r['split']:<18} {r['count']:>6} {r['seconds']:>8.1f}  {metrics}{subset}")
    return "\n".join(lines + [SUBSET_NOTE] * any(r["scored"] < r["of"] for r in rows))


def at_least_1(text):
    """--limit's type: 0 meant every question and -1 all but the last; both are errors now."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of questions >= 1 (leave --limit out for all)")
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (model.load_pretrained)")
    p.add_argument("--bench", required=True, help=f"comma-separated: {','.join(BENCHES)}")
    p.add_argument("--data", required=True, help="a benchmark's folder, or the eval root holding them")
    p.add_argument("--image-folder", default=None, help="default: <benchmark folder>/<BENCHES images>")
    p.add_argument("--questions", default=None, help="question file (one benchmark only)")
    p.add_argument("--annotations", default=None, help="ground truth file (POPE: label folder; one benchmark only)")
    p.add_argument("--template", default=None, help="default: the template the model was trained with")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=at_least_1, default=None, help="only the first N questions (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the official script's (128 or 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the official setting)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--out", default=None, help="answers and results folder; default: <model>/eval")
    p.add_argument("--keep-answers", action="store_true",
                   help="score the answer files as they are, even if other settings (or tools) made them")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped with the model (e.g. OpenELM); never taken from the model's own files")
    p.add_argument("--judge-url", default=None, help="MM-Vet: an OpenAI-compatible chat-completions URL")
    p.add_argument("--judge-model", default="gpt-4-0613")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-runs", type=int, default=1)
    p.add_argument("--judge-allow-http", action="store_true",
                   help="allow an http:// --judge-url (the key travels in clear: only for a judge on this machine)")
    a = p.parse_args(argv)
    benches = [b.strip() for b in a.bench.split(",") if b.strip()]
    for b in benches:
        if b not in BENCHES:
            p.error(f"unknown benchmark {b!r}; valid: {', '.join(BENCHES)}")
    if len(benches) > 1 and (a.questions or a.annotations or a.image_folder):
        p.error("--questions, --annotations and --image-folder need a single --bench")
    template = a.template
    if template is None:
        path = os.path.join(a.model, "train_config.json")
        if not os.path.isfile(path):
            p.error(f"{path} not found: pass --template (the chat template the model was trained with)")
        template = read_json(path)["template"]
    ask = None
    if a.judge_url and "mmvet" in benches:   # checked before the model loads
        try:
            ask = S.openai_compatible_ask(a.judge_url, a.judge_model, os.environ.get(a.judge_key_env),
                                          allow_http=a.judge_allow_http)
        except ValueError as e:
            p.error(f"--judge-url: {e}")
    from model import load_pretrained
    model, tokenizer, processor = load_pretrained(a.model, trust_remote_code=a.trust_remote_code)
    out_dir = a.out or os.path.join(a.model, "eval")
    os.makedirs(out_dir, exist_ok=True)
    weights = fingerprint(a.model, out_dir)
    gen = {"do_sample": a.temperature > 0, "num_beams": a.num_beams,
           **({"temperature": a.temperature, "top_p": a.top_p} if a.temperature > 0 else {})}
    rows = []
    for bench in benches:
        spec = BENCHES[bench]
        folder = a.data if os.path.isfile(os.path.join(a.data, spec["questions"])) else os.path.join(a.data,
                                                                                                      spec["dir"])
        qfile = a.questions or os.path.join(folder, spec["questions"])
        questions = load_questions(bench, qfile)
        items = questions[:a.limit]
        image_folder = a.image_folder or os.path.join(folder, spec["images"])
        answers_file, tokens = os.path.join(out_dir, f"{bench}_answers.jsonl"), a.max_new_tokens or spec["tokens"]
        settings = check_answers(answers_file, {   # everything that changes an answer (module docstring)
            "model": os.path.abspath(a.model), "weights": weights, "template": template, "max_new_tokens": tokens,
            "temperature": a.temperature, "top_p": a.top_p if a.temperature > 0 else None,
            "num_beams": a.num_beams, "image_folder": os.path.abspath(image_folder)}, a.keep_answers)
        t0 = time.time()
        answers = answer(model, tokenizer, processor, items, image_folder, template, answers_file, a.batch_size,
                         tokens, os.path.basename(os.path.normpath(a.model)), **gen)
        seconds = time.time() - t0
        metrics, headline, size = score(bench, answers, items, folder, qfile, image_folder, out_dir, a, ask)
        scored, of = size or (len(items), len(questions))   # no ground truth read: the question file's
        split = spec["split"] if not a.questions else os.path.splitext(os.path.basename(qfile))[0]
        result = {"model": a.model, "bench": bench, "split": split, "count": len(answers), "scored": scored,
                  "of": of, "seconds": round(seconds, 1), "template": template, "answer_settings": settings,
                  "headline": headline, "metrics": metrics}
        write_json(os.path.join(out_dir, f"{bench}_results.json"), result)
        rows.append(result)
    print(f"model {a.model} (template {template})\n" + table(rows))
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, S.JudgeError) as e:   # the messages name the file or option
        sys.exit(f"evaluate.py: error: {e}")

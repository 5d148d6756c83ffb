"""
The files of an evaluation, as evaluate.py reads and writes them: JSON / JSON-lines reading and atomic writes (a
disk error names the file: DiskError), the name every output file of a question set starts with (set_name), each
benchmark's question file as LLaVA's scripts read it, a custom benchmark's references, LLaVA answer files (reused
only with the settings that made them; the files of the processes of a multi-process run merged into one in question
order), and answers in the files the official tools read (EvalAI's VQAv2 upload, MME's calculation.py, MM-Vet's).
"""
import glob
import hashlib
import json
import os
import re
import time
from collections import Counter
from contextlib import contextmanager

from scorers import eval_ai_answer, mmmu_rng

MMMU_MULTI_IMAGE_OPEN = "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS"
SQA_SUFFIX = "Answer with the option's letter from the given choices directly."  # --single-pred-prompt


class DiskError(OSError):
    """A file of the evaluation could not be written or read (disk full, read-only, a folder in its place): one
    line naming the file and the reason ("[Errno 28] No space left on device" alone names none)."""

    def __str__(self):
        return self.strerror


@contextmanager
def disk(path, doing="write"):
    try:
        yield
    except DiskError:
        raise
    except OSError as e:
        why = f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
        raise DiskError(e.errno, f"cannot {doing} {path}: {why}", str(path)) from e


def read_json(path):
    """A JSON file, or JSON lines (.jsonl, and POPE's coco_pope_*.json, which are JSON lines named .json)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (the README's benchmark table says where it comes from)")
    with disk(path, "read"), open(path) as f:
        text = f.read()
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


def write_json(path, obj=None, text=None):
    """Written to a temporary file, then renamed over: a killed run leaves the old file or the new, never half; a
    full disk leaves the old file too (DiskError)."""
    try:
        with disk(path), open(f"{path}.tmp", "w") as f:
            f.write(json.dumps(obj, indent=1) if text is None else text)
        with disk(path):
            os.replace(f"{path}.tmp", path)
    except DiskError:
        try:
            os.remove(f"{path}.tmp")
        except OSError:
            pass
        raise


def append(path, text):
    """`text` added to the end of `path` at once (answer files grow a window of answers at a time)."""
    with disk(path), open(path, "a") as f:
        f.write(text)


def set_name(bench, questions, official):
    """What every output file of a question set is named after (<name>_answers.jsonl, <name>_results.json, ...):
    the benchmark's name for its `official` question file, so the official tools' file names hold
    (vqav2_upload.json, mme_answers/, ...); else <bench>-<the file's name, or its folder's for a file named as the
    official one>-<8 hex digits of its real path>: two question sets never share a file, and the same file (a
    rerun, a larger --limit) finds its answers again."""
    real = os.path.realpath(questions)
    if bench != "custom" and real == os.path.realpath(official):
        return bench
    same = os.path.basename(questions) == os.path.basename(official)
    label = re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.dirname(real)) if same else
                   os.path.splitext(os.path.basename(questions))[0])[:40]
    return "-".join([bench] + [label] * (label not in ("", bench)) + [hashlib.sha256(real.encode()).hexdigest()[:8]])


def key(row):   # what names an answer: MME asks two questions of each question_id (its image)
    return str(row["question_id"]), row["prompt"]


# ------------------------------------------------------------------------- question and reference files
def load_questions(bench, path, mmmu_multi_image="answer"):
    """The question file -> items {question_id, text (the model's question, no image token; with several images
    their <image> placeholders in place), image (a path, a list of paths, or None), prompt (what LLaVA's script
    saves in the answer row), category, answer (preset: not generated)}. MMMU questions with several images are
    answered from all of them ("answer"), or given the original's guess ("guess": TinyLLaVA's numbers)."""
    items = []
    for i, q in enumerate(read_json(path)):
        try:
            if bench == "scienceqa":   # model_vqa_science: LLaVA conversation records; saved prompt has <image>
                text = q["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + SQA_SUFFIX
                item = dict(question_id=q["id"], text=text, image=q.get("image"),
                            prompt=("<image>\n" if q.get("image") else "") + text)
            elif bench == "mmmu":      # model_vqa_mmmu: questions without one "image" have several: not run
                item = dict(question_id=q["id"], text=q["prompt"], image=q.get("image"), prompt=q["prompt"])
                if not isinstance(q.get("image"), str) and mmmu_multi_image == "answer" and mmmu_images(q):
                    item.update(zip(("text", "image"), mmmu_in_place(q["prompt"], mmmu_images(q))))
                elif not isinstance(q.get("image"), str) or not q["image"]:
                    item.update(image=None, answer=mmmu_multi_image_answer(q))
            else:                      # model_vqa_loader / model_vqa: the saved prompt is the file's text
                item = dict(question_id=q["question_id"], text=q["text"], image=q.get("image"), prompt=q["text"],
                            category=q.get("category"))
                if isinstance(item["image"], list):   # several: one <image> each in the text, or all in front
                    n = item["text"].count("<image>")
                    item["text"] = "<image>\n" * len(item["image"]) * (n == 0) + item["text"]
                    if n not in (0, len(item["image"])) or not all(isinstance(x, str) for x in item["image"]):
                        raise TypeError(f"{len(item['image'])} images but {n} <image> placeholders")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: record {i} is not a {bench} question ({type(e).__name__}: {e}): "
                             f"{json.dumps(q)[:200]}") from None
        items.append(item)
    count = Counter(map(key, items))   # MME has two questions per question_id (the image)
    twice = [it for it in items if count[key(it)] > 1]
    if twice:
        raise ValueError(f"{path}: question_id {twice[0]['question_id']!r} with prompt {twice[0]['prompt'][:60]!r} "
                         "appears more than once; answers are keyed by both")
    return items


def image_files(item) -> list:
    """An item's image paths: [] (none), [path] or its list."""
    image = item.get("image")
    return [] if not image else list(image) if isinstance(image, list) else [image]


def mmmu_images(question) -> list:
    """The image files of a MMMU question with several: an "image" list, or image_1 ... image_7 (MMMU's fields)."""
    if isinstance(question.get("image"), list):
        return list(question["image"])
    return [question[f"image_{k}"] for k in range(1, 8) if isinstance(question.get(f"image_{k}"), str)]


def mmmu_in_place(prompt, files):
    """(text, images): each image right after the first `<image k>` that names it, in order of mention (k-th file
    for k); those never named lead the text. A text already holding `<image>` placeholders stays as it is."""
    if prompt.count("<image>") == len(files):
        return prompt, list(files)
    order = []
    for m in re.finditer(r"<image (\d+)>", prompt):
        k = int(m.group(1))
        if 1 <= k <= len(files) and k not in order:
            order.append(k)
    text = prompt
    for k in order:
        text = text.replace(f"<image {k}>", f"<image {k}> <image>", 1)
    rest = [k for k in range(1, len(files) + 1) if k not in order]
    return "".join(f"<image {k}> <image>\n" for k in rest) + text, [files[k - 1] for k in rest + order]


def mmmu_multi_image_answer(question, seed=42):
    """The row TinyLLaVA writes for a question without a single "image" (quirk 21): a guessed letter (mmmu_rng)
    or the INVALID string. The generation loop writes it, so the denominator stays the official 900."""
    if question["question_type"] == "multiple-choice":
        return mmmu_rng(question["id"], seed).choice(question["all_choices"])
    return MMMU_MULTI_IMAGE_OPEN


def read_references(path):
    """A custom benchmark's references {str(id): [text, ...]}: rows {"question_id", "answers": [text | {"answer":
    text}, ...]} ("answer": text for one), or a VQAv2 annotation file ({"annotations": [...]})."""
    rows = read_json(path)
    rows = rows["annotations"] if isinstance(rows, dict) and "annotations" in rows else rows
    refs = {}
    for i, r in enumerate(rows if isinstance(rows, list) else [rows]):
        got = r.get("answers", r.get("answer")) if isinstance(r, dict) else None
        got = [got] if isinstance(got, str) else got
        if not (got and isinstance(got, list) and "question_id" in r):
            raise ValueError(f"{path}: record {i} is not {{'question_id': ..., 'answers': [...]}}: {str(r)[:200]}")
        refs[str(r["question_id"])] = [g["answer"] if isinstance(g, dict) else str(g) for g in got]
    return refs


# --------------------------------------------- answer files: the settings they stand for, resume, merge
MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")   # weights, configs, tokenizers


def fingerprint(model_dir, out_dir):
    """Path, size and mtime of every weight, config, tokenizer and template file in the model folder: retraining
    or replacing the model changes it. The answers' folders (out_dir, <model>/eval) are not the model's."""
    h, skip = hashlib.sha256(), {os.path.abspath(out_dir), os.path.abspath(os.path.join(model_dir, "eval"))}
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) not in skip)
        for name in sorted(f for f in files if f.endswith(MODEL_FILES)):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(root, model_dir)}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def shards(answers_file):
    """The answer files of each process of a multi-process run (rank 0 merges them into answers_file)."""
    return sorted(glob.glob(glob.escape(answers_file[:-len(".jsonl")]) + ".rank*.jsonl"))


def check_answers(answers_file, settings, keep=False):
    """Keep the answers on file only if `settings` made them, else rename them aside (module docstring); with
    keep, keep them whatever made them. Writes and returns the settings the answer file stands for."""
    side = answers_file[:-len(".jsonl")] + ".settings.json"
    old = read_json(side) if os.path.isfile(side) else None
    if (os.path.isfile(answers_file) or shards(answers_file)) and old != settings:
        if keep:   # recorded, so a later run without --keep-answers sets the mixed file aside
            base = {k: v for k, v in (old or {}).items() if k != "earlier_answers"}
            settings = old if base == settings else {**settings, "earlier_answers": old}
        else:
            now = time.strftime("%Y%m%d-%H%M%S")   # two runs in one second keep both
            stamp = next(s for s in [now] + [f"{now}-{n}" for n in range(1, 999)]
                         if not glob.glob(f"{answers_file[:-len('.jsonl')]}*.{s}.old"))
            for f in [answers_file, side] + shards(answers_file):
                if os.path.isfile(f):
                    with disk(f, "move aside"):
                        os.replace(f, f"{f}.{stamp}.old")
            if old is None:
                why = "no settings file: an older evaluate.py or another tool made it; --keep-answers keeps it"
            else:
                why = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
                why = why or "it holds answers kept by --keep-answers"
            print(f"{answers_file}: made with other settings ({why}); moved aside to {answers_file}.{stamp}.old")
    write_json(side, settings)
    return settings


def on_file(answers_file):
    """{key: row} of the answer file and its shards (a key's first row wins); the partial last line a run killed
    mid-write leaves is not read."""
    rows = {}
    for path in [answers_file] + shards(answers_file):
        with disk(path, "open"), open(path, "a+") as f:   # a missing answer file is made (empty)
            f.seek(0)
            text = f.read()
        for r in (json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines() if x.strip()):
            rows.setdefault(key(r), r)
    return rows


def merge(answers_file, items):
    """The answers on file as one file, then the shards removed: the asked questions first, in question order
    (POPE's and MME's official scorers read in order), then any others. Returns the asked questions' rows."""
    rows = on_file(answers_file)
    order = [key(it) for it in items if key(it) in rows]
    keys = order + [k for k in rows if k not in set(order)]
    write_json(answers_file, text="".join(json.dumps(rows[k]) + "\n" for k in keys))
    for path in shards(answers_file):
        with disk(path, "remove"):
            os.remove(path)
    return [rows[k] for k in order]


# ----------------------------------------------------------- answers in the official tools' own formats
def vqav2_submission(answers, test_question_ids):
    """EvalAI upload (quirk 5): per test id (ids or test2015 jsonl rows) EvalAIAnswerProcessor(text), or ''."""
    preds = {str(r["question_id"]): r["text"] for r in answers}
    ids = [q["question_id"] if isinstance(q, dict) else q for q in test_question_ids]
    return [{"question_id": q, "answer": eval_ai_answer(preds[str(q)]) if str(q) in preds else ""} for q in ids]


def mme_task_lines(answers, gt_folder):
    """(lines, number of ground-truth questions). LLaVA's convert_answer_to_mme.py: per task, lines 'file<TAB>question
    <TAB>gt<TAB>prediction' in answer order, the ground truth from MME_Benchmark_release_version/<task>/
    [questions_answers_YN/]*.txt; tabs and newlines in a prediction become spaces (calculation.py splits on them)."""
    gt = {}
    for task in sorted(os.listdir(gt_folder)):
        qa = os.path.join(gt_folder, task, "questions_answers_YN")
        qa = qa if os.path.isdir(qa) else os.path.join(gt_folder, task)
        for path in sorted(glob.glob(os.path.join(glob.escape(qa), "*.txt"))):
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"{path} line {n}: expected 'question<TAB>answer', got {line!r}")
                    gt[task, os.path.basename(path), parts[0]] = parts[1]
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


def mmvet_submission(answers):
    """convert_mmvet_for_eval.py: {"v1_<question_id>": text}, the file the official grader reads."""
    return {f"v1_{r['question_id']}": r["text"] for r in answers}

"""
LLaVA answer files, as evaluate.py keeps them: JSON / JSON-lines reading, atomic writes, the settings an answer file
stands for (answers are reused only with the settings that made them), and the answer files of the processes of a
multi-process run, merged into one in question order.
"""
import glob
import hashlib
import json
import os
import time


def read_json(path):
    """A JSON file, or JSON lines (.jsonl, and POPE's coco_pope_*.json, which are JSON lines named .json)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (the README's benchmark table says where it comes from)")
    with open(path) as f:
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


def key(row):
    return str(row["question_id"]), row["prompt"]


def write_json(path, obj=None, text=None):
    """Written to a temporary file, then renamed over: a killed run leaves the old file or the new, never half."""
    with open(f"{path}.tmp", "w") as f:
        f.write(json.dumps(obj, indent=1) if text is None else text)
    os.replace(f"{path}.tmp", path)


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
        with open(path, "a+") as f:   # a missing answer file is made (empty)
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
        os.remove(path)
    return [rows[k] for k in order]

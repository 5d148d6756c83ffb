"""
Check a LLaVA-format data set before a long run: read every record, list every problem with its index, id and
code as it is found, and print a summary (counts by problem code, token lengths including the image tokens).
Exit status 1 if a record is bad.

    python check_data.py data/llava_v1_5_mix665k.json --image-folder data --config configs/phi2_siglip_base.py
    python check_data.py data.json --image-folder images --model out/phi2_siglip_base/2_finetune
    python check_data.py data.json --image-folder images --tokenizer DIR --template phi --num-image-tokens 729

What it finds, by code (record_problems here, data.load_image, then data.encode; training meets the same ones):
  file         bad-json, bad-top-level (not a list of records), no-records: "error: ..." and nothing else
  record       bad-jsonl-line (each one, with its line; the lines after it are still read), not-an-object,
               no-conversations, bad-turn, empty-conversation, empty-turn, starts-with-assistant,
               turns-not-alternating, unanswered-last-turn, text-unencodable (a lone surrogate: "\\ud800"),
               duplicate-id (reported; training keeps it), bad-image-field, image-without-placeholder,
               placeholder-without-image, multiple-images, image-in-answer, image-outside (an absolute path or one
               through '..'; --allow-outside-images)
  image        image-missing, image-not-a-file, image-unreadable, image-truncated, image-too-large (over
               data.MAX_IMAGE_PIXELS; in training with image_aspect_ratio="pad", also a square over MAX_PAD_SIDE)
  sample       answer-truncated (at max_length), no-supervised-tokens, prompt-too-long, template-error,
               feature-cache-miss
  anything     internal-error: an exception on one record is reported with its text, and the check goes on
A leading system message is dropped, as the original does: a note, not a problem. --config takes the tokenizer,
template, max_length and image-token count of one stage of the recipe (--stage; default: the stage that trains
on this file, else the last). Training: bad_samples="error" stops at the first bad record, "skip" leaves it out
and counts it (data.VLMDataset).
"""
import argparse
import json
import os
import sys
from collections import Counter

# data.py (and torch with it) is imported inside the functions that use it: --help answers at once, and data.py
# imports scan from here.
PROGRESS_MIN = 1000   # records from which a progress bar is shown (on stderr)


def record_problems(record, allow_outside_images=False) -> list[tuple[str, str]]:
    """[(code, message)] of one record: shape, text, turns, <image> vs 'image', a path outside the image folder."""
    from data import IMAGE_PLACEHOLDER, BadLine, DataError, _turns
    if isinstance(record, BadLine):
        return [("bad-jsonl-line", f"bad JSON line: {record.error}")]
    if not isinstance(record, dict):
        return [("not-an-object", f"record is a {type(record).__name__}, expected an object")]
    convs = record.get("conversations")
    if not isinstance(convs, list):
        return [("no-conversations", "missing or non-list 'conversations'")]
    for t, turn in enumerate(convs):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return [("bad-turn", f"turn {t} must be {{'from': str, 'value': str}}, got {turn!r:.80}")]
    problems = []
    texts = [v for v in (record.get("id"), record.get("image")) if isinstance(v, str)]
    try:   # json.load accepts a lone surrogate ("\ud800"), and a tokenizer then fails with a TypeError
        "".join(texts + [m["from"] + m["value"] for m in convs]).encode("utf-8")
    except UnicodeEncodeError:
        problems.append(("text-unencodable", "text that cannot be encoded (a lone surrogate such as '\\ud800')"))
    problems += [("empty-turn", f"turn {t} ({turn['from']}) is empty") for t, turn in enumerate(convs)
                 if not turn["value"].strip()]
    try:
        _turns(convs, for_generation=False)
    except DataError as e:
        problems.append((e.code, str(e)))
    n_tags = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in convs if turn["from"] != "gpt")
    image = record.get("image")
    if any(IMAGE_PLACEHOLDER in turn["value"] for turn in convs if turn["from"] == "gpt"):
        problems.append(("image-in-answer", f"{IMAGE_PLACEHOLDER} inside a gpt turn"))
    if image is not None and not (isinstance(image, str) and image):
        problems.append(("bad-image-field", f"'image' must be a non-empty relative path, got {image!r}"))
    elif n_tags > 1:
        problems.append(("multiple-images", f"{n_tags} {IMAGE_PLACEHOLDER} placeholders; one image per sample"))
    elif image is not None and n_tags == 0:
        problems.append(("image-without-placeholder", f"has 'image' but no {IMAGE_PLACEHOLDER} in its text"))
    elif image is None and n_tags == 1:
        problems.append(("placeholder-without-image", f"has {IMAGE_PLACEHOLDER} in its text but no 'image'"))
    # lexical, so that a data set laid out with symbolic links inside the image folder still works
    outside = isinstance(image, str) and (os.path.isabs(image) or os.path.normpath(image).split(os.sep)[0] == "..")
    if outside and not allow_outside_images:
        problems.append(("image-outside", f"image path {image!r} leaves the image folder (allow_outside_images)"))
    return problems


def scan(records, allow_outside_images=False):
    """(index, record, [(code, message)]) per record: record_problems, duplicate-id, internal-error (an exception)."""
    first = {}
    for i, record in enumerate(records):
        try:
            problems = record_problems(record, allow_outside_images)
        except Exception as e:  # noqa: BLE001 - one record's surprise must not stop a check of 600k
            problems = [("internal-error", f"{type(e).__name__}: {e}")]
        rid = record.get("id") if isinstance(record, dict) else None
        if rid is not None and first.setdefault(repr(rid), i) != i:   # repr: 1 and "1" are different ids
            problems.append(("duplicate-id", f"id {rid!r} is also the id of record {first[repr(rid)]}"))
        yield i, record, problems


def check(records, image_folder=None, tokenizer=None, template="phi", num_image_tokens=0, max_length=None,
          allow_outside_images=False, on_problem=None, progress=False):
    """-> {"problems": [(index, id, code, message)], "notes": [(index, id, message)], "lengths": [tokens],
    "over_max_length": n, ...}. on_problem(index, record, code, message) is called as each problem or note (code
    "note") is found."""
    from tqdm import tqdm
    from data import DataError, encode, load_image
    problems, notes, lengths, over = [], [], [], 0
    bar = tqdm(total=len(records), unit=" records", file=sys.stderr,
               disable=not progress or len(records) < PROGRESS_MIN)
    for i, r, found in scan(records, allow_outside_images):
        rid = r.get("id") if isinstance(r, dict) else None
        try:
            if not found and image_folder is not None and r.get("image") is not None:   # training: when read
                try:
                    load_image(os.path.join(image_folder, r["image"]))
                except DataError as e:
                    found.append((e.code, str(e)))
            if not found and r["conversations"][0]["from"] != "human":
                notes.append((i, rid, f"first message is from {r['conversations'][0]['from']!r}: dropped, as the "
                                      "original does"))
                if on_problem:
                    on_problem(i, r, "note", notes[-1][2])
            if not found and tokenizer is not None:
                try:
                    n = len(encode(r["conversations"], template, tokenizer, num_image_tokens)["input_ids"])
                    lengths.append(n)
                    if max_length and n > max_length:
                        over += 1
                        encode(r["conversations"], template, tokenizer, num_image_tokens, max_length)
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
            "notes": notes, "lengths": lengths, "over_max_length": over}


def percentiles(values, qs=(50, 90, 99, 100)):
    v = sorted(values)
    return {f"p{q}" if q < 100 else "max": v[min(len(v) - 1, int(len(v) * q / 100))] for q in qs} if v else {}


def settings_from_config(path, stage_name, data_path):
    """tokenizer, template, max_length, num_image_tokens of one stage of a train.py config (no weights loaded)."""
    import train
    from model import ModelArgs, count_image_tokens, load_tokenizer
    cfg = train.load_config(["--config", path])
    stages = train.stage_configs(cfg)
    if stage_name:
        matches = [s for s in stages if s["stage"] == stage_name]
        if not matches:
            raise SystemExit(f"{path}: no stage {stage_name!r}; stages: {', '.join(s['stage'] for s in stages)}")
        stage = matches[0]
    else:
        file_of = lambda s: s.get(f"data_{s['data']}") or ""  # noqa: E731
        same = [s for s in stages if file_of(s) and os.path.abspath(file_of(s)) == os.path.abspath(data_path)]
        stage = (same or stages)[-1]
    args = ModelArgs(**{k: stage[k] for k in ModelArgs.__dataclass_fields__ if k in stage})
    return (load_tokenizer(stage["tokenizer"] or stage["llm"], stage["trust_remote_code"]), stage["template"],
            stage["max_length"], count_image_tokens(args), stage["stage"], stage.get("allow_outside_images", False))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="LLaVA-format .json or .jsonl")
    p.add_argument("--image-folder", default=None, help="check that every image opens (omit: skip that check)")
    p.add_argument("--config", default=None, help="a train.py config: tokenizer, template, lengths of a stage")
    p.add_argument("--stage", default=None)
    p.add_argument("--model", default=None, help="a saved model directory instead of --config")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--template", default="phi")
    p.add_argument("--num-image-tokens", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths that are absolute or leave --image-folder through '..'")
    p.add_argument("--show", type=int, default=50, help="problems to print (all are counted); -1: all")
    a = p.parse_args(argv)
    from tqdm import tqdm
    from data import DataError, _where, read_records
    tokenizer, template, max_length, n_img, where = None, a.template, a.max_length, a.num_image_tokens, ""
    outside = a.allow_outside_images
    if a.config:
        tokenizer, template, max_length, n_img, stage, in_config = settings_from_config(a.config, a.stage, a.data)
        where, outside = f" (stage {stage} of {a.config})", outside or in_config
    elif a.model:
        from model import load_tokenizer
        tokenizer = load_tokenizer(a.model)
        with open(os.path.join(a.model, "config.json")) as f:
            n_img = json.load(f)["num_image_tokens"]
        train_cfg = os.path.join(a.model, "train_config.json")
        if os.path.isfile(train_cfg):
            with open(train_cfg) as f:
                saved = json.load(f)
            template, max_length = saved.get("template", template), max_length or saved.get("max_length")
    elif a.tokenizer:
        from model import load_tokenizer
        tokenizer = load_tokenizer(a.tokenizer)
    if tokenizer is not None and n_img is None:
        p.error("--num-image-tokens is needed with --tokenizer (or use --config / --model)")
    if hasattr(sys.stdout, "reconfigure"):   # a file name or id the terminal cannot show must not stop the check
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        records = read_records(a.data)
    except (DataError, OSError) as e:
        print(f"error: {e}" + (f" [{e.code}]" if isinstance(e, DataError) else ""), file=sys.stderr)
        return 1
    shown = [0]

    def show(i, record, code, message):   # as found: a check of 600k records shows its first problems at once
        shown[0] += code != "note"
        if a.show < 0 or shown[0] <= a.show:
            text = f"note: {message}" if code == "note" else f"{message} [{code}]"
            tqdm.write(f"{_where(a.data, i, record)}: {text}", file=sys.stdout)
            sys.stdout.flush()
        elif shown[0] == a.show + 1 and code != "note":
            tqdm.write(f"... further problems are counted, not shown (--show {a.show})", file=sys.stdout)

    report = check(records, a.image_folder, tokenizer, template, n_img or 0, max_length, outside, show, True)
    kinds = Counter(code for _, _, code, _ in report["problems"])
    print(f"\n{a.data}{where}: {report['records']} records ({report['image']} with an image, "
          f"{report['text_only']} text-only); {len({i for i, _, _, _ in report['problems']})} with problems; "
          f"{len(report['notes'])} with a leading system message (dropped, as the original does)")
    for kind, n in kinds.most_common():
        print(f"  {n:>7}  {kind}")
    if report["lengths"]:
        lens = percentiles(report["lengths"])
        print(f"tokens per sample incl. {n_img} per image ({template} template): "
              + ", ".join(f"{k} {v}" for k, v in lens.items())
              + (f"; {report['over_max_length']} longer than max_length {max_length} (truncated)" if max_length
                 else ""))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

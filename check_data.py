"""
Check a LLaVA-format data set before a long run: read every record, list every problem with its index and id,
and print a summary (counts, token lengths including the image tokens). Exit status 1 if a record is bad.

    python check_data.py data/llava_v1_5_mix665k.json --image-folder data --config configs/phi2_siglip_base.py
    python check_data.py data.json --image-folder images --model out/phi2_siglip_base/2_finetune
    python check_data.py data.json --image-folder images --tokenizer DIR --template phi --num-image-tokens 729

What it finds (data.record_problems, then data.encode): a missing or unreadable image; an 'image' field without
<image> in the text or the reverse; more than one <image>; turns that do not alternate human/gpt or do not start
with human (a leading non-human message is dropped, as the original does: reported as a note); empty turns; an
unanswered last turn; samples whose answers would be truncated away at max_length. --config takes the tokenizer,
template, max_length and image-token count of one stage of the recipe (--stage; default: the stage that trains
on this file, else the last). Training applies the same checks: bad_samples="error" stops at the first bad record,
"skip" leaves it out and counts it.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter

from data import DataError, encode, read_records, record_problems


def check(records, image_folder=None, tokenizer=None, template="phi", num_image_tokens=0, max_length=None):
    """-> {"problems": [(index, id, problem)], "notes": [...], "lengths": [tokens], "over_max_length": n, ...}"""
    problems, notes, lengths, over = [], [], [], 0
    for i, r in enumerate(records):
        rid = r.get("id") if isinstance(r, dict) else None
        found = record_problems(r, image_folder)
        if not found and r["conversations"][0]["from"] != "human":
            notes.append((i, rid, f"first message is from {r['conversations'][0]['from']!r}: dropped, as the "
                                  "original does"))
        if not found and tokenizer is not None:
            try:
                n = len(encode(r["conversations"], template, tokenizer, num_image_tokens)["input_ids"])
                lengths.append(n)
                if max_length and n > max_length:
                    over += 1
                    encode(r["conversations"], template, tokenizer, num_image_tokens, max_length)
            except DataError as e:
                found.append(str(e))
        problems += [(i, rid, p) for p in found]
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
            stage["max_length"], count_image_tokens(args), stage["stage"])


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
    p.add_argument("--show", type=int, default=50, help="problems to print (all are counted)")
    a = p.parse_args(argv)
    tokenizer, template, max_length, n_img, where = None, a.template, a.max_length, a.num_image_tokens, ""
    if a.config:
        tokenizer, template, max_length, n_img, stage = settings_from_config(a.config, a.stage, a.data)
        where = f" (stage {stage} of {a.config})"
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
    try:
        records = read_records(a.data)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = check(records, a.image_folder, tokenizer, template, n_img or 0, max_length)
    for i, rid, problem in report["problems"][:a.show]:
        print(f"{a.data}: record {i} (id={rid!r}): {problem}")
    if len(report["problems"]) > a.show:
        print(f"... and {len(report['problems']) - a.show} more problems")
    kinds = Counter("cannot read image" if problem.startswith("cannot read image") else re.sub(r"\d+", "N", problem)
                    for _, _, problem in report["problems"])
    print(f"\n{a.data}{where}: {report['records']} records ({report['image']} with an image, "
          f"{report['text_only']} text-only); {len({i for i, _, _ in report['problems']})} with problems; "
          f"{len(report['notes'])} notes (leading non-human message dropped)")
    for kind, n in kinds.most_common(20):
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

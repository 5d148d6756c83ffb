"""
The data check a run makes at start-up (train.py, check_data_at_start), apart from the command line that makes it by
hand (check_data.py): every stage's data file, record by record as training will read it (data.check), with the
stage's settings and its model's tokenizer and image-token count (model_settings: no weights loaded; check_data.py
--config reads a stage's the same way).

    check_stages(stage_configs, start)   # start: the saved model the first stage starts from (else its llm, towers)
"""
import json
import os
import sys
import time
from collections import Counter

from errors import ConfigError
# data.py and model.py (and torch with them) are imported inside the functions that use them: check_data.py --help
PROGRESS_MIN = 1000   # records from which a progress bar is shown (on stderr)


def model_settings(stage, folder=None):
    """(tokenizer, image tokens per image) of a stage's model, no weights loaded: a saved model folder's (its
    config.json), else from the stage's llm (or tokenizer) and towers' configs."""
    from model import ModelArgs, count_image_tokens, load_tokenizer
    if folder:
        with open(os.path.join(folder, "config.json")) as f:
            return load_tokenizer(folder), json.load(f)["num_image_tokens"]
    args = ModelArgs(**{k: stage[k] for k in ModelArgs.__dataclass_fields__ if k in stage})
    return load_tokenizer(stage["tokenizer"] or stage["llm"], stage["trust_remote_code"]), count_image_tokens(args)


def check_stages(stages, start=None, show=50):
    """train.py's start-up check (check_data_at_start): each stage's data file as `check_data.py --config` checks it,
    with the stage's template, max_length, image_aspect_ratio, image folder and allow_outside_images, and the model's
    tokenizer and image-token count (`start`: the saved model the first stage starts from, else its llm and towers).
    A file is checked once per set of settings. Bad records are printed as found (stderr, at most `show` per file),
    each file's count and time after it. Stages with bad records and bad_samples="error" then raise one ConfigError,
    a line per stage; "skip" stages are only reported. Returns [(stage, file, records, bad, seconds)]."""
    from data import NOT_BAD, DataError, _where, check, read_records
    from tqdm import tqdm
    try:
        tokenizer, n_img = model_settings(stages[0], start)
    except (OSError, KeyError, ValueError) as e:   # a Hub id or the original's layout: no config.json of ours
        print(f"data check: records and images only, no token lengths ({start}: {type(e).__name__}: {e})")
        tokenizer, n_img = None, 0
    done, errors, out = {}, [], []
    for s in stages:
        data, images = s[f"data_{s['data']}"], s[f"images_{s['data']}"] or None
        key = (data, images, s["template"], s["max_length"], s["image_aspect_ratio"], s["allow_outside_images"],
               s["max_images"])
        if key not in done:
            t0, shown = time.time(), [0]

            def found(i, record, code, message):
                if code != "note" and code not in NOT_BAD:
                    shown[0] += 1
                    if shown[0] <= show:
                        tqdm.write(f"{_where(data, i, record)}: {message} [{code}]", file=sys.stderr)
            try:
                records = read_records(data)
            except (DataError, OSError) as e:
                errors.append(f"stage {s['stage']}: {e}")
                continue
            report = check(records, images, tokenizer, s["template"], n_img, s["max_length"],
                           s["allow_outside_images"], found, len(records) >= PROGRESS_MIN and sys.stderr.isatty(),
                           s["image_aspect_ratio"], s["max_images"])
            bad = Counter(c for _, _, c, _ in report["problems"] if c not in NOT_BAD)
            n_bad = len({i for i, _, c, _ in report["problems"] if c not in NOT_BAD})
            done[key] = (len(records), n_bad, bad, time.time() - t0)
            print(f"data check, stage {s['stage']}: {data}: {len(records)} records, {n_bad or 'none'} bad"
                  + f" ({shown[0] - show} more not shown)" * (shown[0] > show) + f" ({done[key][3]:.1f} s)", flush=True)
        n, n_bad, bad, seconds = done[key]
        out.append((s["stage"], data, n, n_bad, seconds))
        kinds = ", ".join(f"{c} {k}" for c, k in bad.most_common())
        if n_bad and s["bad_samples"] == "error":
            errors.append(f"stage {s['stage']}: {data}: {n_bad} of {n} records bad ({kinds}), listed above; the run "
                          "stops before training: fix or remove them, or --bad_samples=skip leaves them out")
        elif n_bad:
            print(f"stage {s['stage']}: bad_samples=skip leaves these {n_bad} records out ({kinds})")
    if errors:
        raise ConfigError("\n".join(errors))
    return out

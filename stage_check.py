"""
The data check a run makes at start-up (train.py, check_data_at_start), apart from the command line that makes it by
hand (check_data.py): every stage's data file, record by record as training will read it (data.check), with the
stage's settings and its model's tokenizer, image-token count and tiling (model_settings: no weights loaded;
check_data.py --config reads a stage's the same way). Tiled (max_tiles > 0: the stage's, else that of the model it
starts from, as training's model.set_tiling), each image counts the tokens of its grid, and a line per file gives the
tokens per image (image_token_line: p50, p90, max, the grids).

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
    """(tokenizer, image tokens per image (tiled: per view), max_tiles, tile) of a stage's model, no weights loaded:
    a saved model folder's (its config.json), else from the stage's llm (or tokenizer) and towers' configs. max_tiles
    as training sets it (model.set_tiling): the stage's when not 0, else the folder's (0 without one); tile: the
    tower's (H, W) input, what the grid of each image is chosen for (None when not tiled)."""
    from model import ModelArgs, count_image_tokens, load_tokenizer
    if folder:
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        tiles = stage.get("max_tiles") or saved.get("max_tiles") or 0
        return load_tokenizer(folder), saved["num_image_tokens"], tiles, tile_size(folder) if tiles else None
    args = ModelArgs(**{k: stage[k] for k in ModelArgs.__dataclass_fields__ if k in stage})
    tiles = stage.get("max_tiles") or 0
    return (load_tokenizer(stage["tokenizer"] or stage["llm"], stage["trust_remote_code"]), count_image_tokens(args),
            tiles, tile_size(args.vision_tower) if tiles else None)


def tile_size(path):
    """(H, W) of a tile: the input of the tower whose image processor is in `path` (a tower or a saved model folder;
    MoF: CLIP's), as training tiles (modeling_tinyllava_nano.image_size)."""
    from folders import load_image_processor
    from modeling_tinyllava_nano import image_size
    return image_size(load_image_processor(path))


def short_side_of(path):
    """The side the image processor in `path` (a tower or a saved model folder) resizes short sides to
    (images.short_side), or None: also when there is none to read here (a Hub id not downloaded)."""
    from errors import LoadError
    from folders import load_image_processor
    from images import short_side
    try:
        return short_side(load_image_processor(path))
    except (OSError, ValueError, LoadError):   # training's load says why, in its own words
        return None


def percentiles(values, qs=(50, 90, 99, 100)):
    v = sorted(values)
    return {f"p{q}" if q < 100 else "max": v[min(len(v) - 1, int(len(v) * q / 100))] for q in qs} if v else {}


def image_token_line(counts, per_view, max_tiles):
    """The tokens per image of a tiled check (data.check's "image_tokens": each image read), in words: p50 / p90 /
    max, and the mix of grids (a count names its grid, connectors.image_tokens, unless two grids share it: then no
    mix; per_view >= max_tiles keeps them apart)."""
    from connectors import image_tokens
    line = f"tokens per image, tiled (max_tiles={max_tiles}, {per_view} per view): " + (
        ", ".join(f"{k} {v}" for k, v in percentiles(counts, (50, 90, 100)).items()) or "no image read")
    grids = {}
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            grids.setdefault(image_tokens(per_view, (rows, cols)), []).append(f"{rows}x{cols}")
    mix = Counter(counts)
    if mix and all(len(grids.get(n, ())) == 1 for n in mix):
        line += "; grids " + ", ".join(f"{grids[n][0]} {k}" for n, k in sorted(mix.items()))
    return line


def check_stages(stages, start=None, show=50):
    """train.py's start-up check (check_data_at_start): each stage's data file as `check_data.py --config` checks it,
    with the stage's template, max_length, image_aspect_ratio, image folder and allow_outside_images, and the model's
    tokenizer, image-token count and tiling (`start`: the saved model the first stage starts from, else its llm and
    towers; each later stage keeps the tiling of the one before unless its max_tiles is not 0).
    A file is checked once per set of settings. Bad records are printed as found (stderr, at most `show` per file),
    each file's count and time after it. Stages with bad records and bad_samples="error" then raise one ConfigError,
    a line per stage; "skip" stages are only reported. Returns [(stage, file, records, bad, seconds)]."""
    from data import NOT_BAD, DataError, _where, check, read_records
    from tqdm import tqdm
    try:
        tokenizer, n_img, tiles, tile = model_settings(stages[0], start)
    except (OSError, KeyError, ValueError) as e:   # a Hub id or the original's layout: no config.json of ours
        print(f"data check: records and images only, no token lengths ({start}: {type(e).__name__}: {e})")
        tokenizer, n_img, tiles, tile = None, 0, 0, None
    done, errors, out = {}, [], []
    for s in stages:
        data, images = s[f"data_{s['data']}"], s[f"images_{s['data']}"] or None
        if tokenizer is not None:   # each stage starts from the one before: its max_tiles, when not 0, turns tiling on
            tiles = s["max_tiles"] or tiles                                                 # or changes it (set_tiling)
            tile = tile or (tile_size(start if start else s["vision_tower"]) if tiles else None)
        short = short_side_of(start or s["vision_tower"]) if s["image_aspect_ratio"] == "square" else None
        key = (data, images, s["template"], s["max_length"], s["image_aspect_ratio"], s["allow_outside_images"],
               s["max_images"], tiles, short)
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
                           s["image_aspect_ratio"], s["max_images"], tiles, tile, short)
            bad = Counter(c for _, _, c, _ in report["problems"] if c not in NOT_BAD)
            n_bad = len({i for i, _, c, _ in report["problems"] if c not in NOT_BAD})
            done[key] = (len(records), n_bad, bad, time.time() - t0)
            print(f"data check, stage {s['stage']}: {data}: {len(records)} records, {n_bad or 'none'} bad"
                  + f" ({shown[0] - show} more not shown)" * (shown[0] > show) + f" ({done[key][3]:.1f} s)", flush=True)
            if tiles:
                print(f"data check, stage {s['stage']}: {data}: "
                      + image_token_line(report["image_tokens"], n_img, tiles), flush=True)
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

"""
Check a LLaVA-format data set before a long run: read every record, list every problem with its index, id and
code as it is found, and print a summary (counts by problem code, token lengths including the image tokens).
Exit status 1 if a record is bad (any problem but duplicate-id, which training keeps) or the file cannot be
read, 2 for a bad argument (a file or folder that is not there, a value out of range, a --config in error: one
line each), else 0.

    python check_data.py data/llava_v1_5_mix665k.json --image-folder data --config configs/phi2_siglip_base.py
    python check_data.py data.json --image-folder images --model out/phi2_siglip_base/2_finetune
    python check_data.py data.json --image-folder images --tokenizer DIR --template phi --num-image-tokens 729
    python check_data.py data.json --image-folder images --tokenizer DIR --num-image-tokens 729 --max-tiles 4 \\
        --tile-size 384          # tiled: 729 tokens per view, a grid of <= 4 tiles of 384x384 per image

What it finds, by code (data.check: records.record_problems, data.load_image, data.encode, as training reads):
  file         bad-json, bad-top-level (not a list of records), no-records: "error: ..." and nothing else
  record       bad-jsonl-line (each one, with its line; the lines after it are still read), not-an-object,
               no-conversations, bad-turn, empty-conversation, empty-turn, starts-with-assistant,
               turns-not-alternating, unanswered-last-turn, text-unencodable (a lone surrogate: "\\ud800"),
               duplicate-id (reported; training keeps it), bad-image-field, image-without-placeholder,
               placeholder-without-image, image-count-mismatch (a list's entries vs its <image>s, or several with
               one path), empty-image-list, repeated-image, too-many-images (records.MAX_IMAGES), image-in-answer,
               image-outside (an absolute path or one through '..'; --allow-outside-images)
  image        image-missing, image-not-a-file (a directory, FIFO, device: only a regular file is opened),
               image-unreadable, image-truncated, image-too-large (over images.MAX_IMAGE_PIXELS; with
               image_aspect_ratio "pad", also a padded square over images.MAX_PAD_SIDE; "square" with --config or
               --model whose tower resizes the short side (CLIP, DINOv2), also a resized image over the former)
  sample       answer-truncated (at max_length), images-over-max-length, no-supervised-tokens, prompt-too-long,
               template-error, feature-cache-miss
  anything     internal-error: an exception on one record is reported with its text, and the check goes on
A leading system message is dropped, as the original does: a note, not a problem. --config takes the tokenizer,
template, max_length, image-token count and image_aspect_ratio of one stage of the recipe (--stage; default: the
stage that trains on this file, else the last; the model of its init_from when that is a folder of ours); --model
those of a saved model. Tiling (max_tiles > 0: the stage's, else that of the model it starts from, as training does;
--model: its config.json's; --max-tiles N overrides either, and with --tokenizer it needs --tile-size, the vision
tower's input side): each image counts the tokens of the grid its shape gets (--num-image-tokens is then per view), a
sample's images together must leave room for text in max_length (images-over-max-length), and the summary adds the
tokens per image (p50, p90, max) and the mix of grids. Training: bad_samples="error"
stops at the first bad record, "skip" leaves it out and counts it (data.VLMDataset); and before its first stage
trains, train.py checks every stage's data this way (stage_check.py; check_data_at_start=False skips it).
"""
import argparse
import json
import os
import sys
from collections import Counter

# data.py (and torch with it) is imported inside the functions that use it: --help answers at once.
from settings import TEMPLATES, TRAIN, Choice, ConfigError, File, Folder, Int, Model, Parser
from stage_check import PROGRESS_MIN, check_stages, model_settings  # noqa: F401 (check_data.check_stages, as before)
from stage_check import image_token_line, percentiles, short_side_of


def __getattr__(name):   # check_data.check is data.check, imported (and torch with it) when first asked for
    if name == "check":
        from data import check
        return check
    raise AttributeError(f"module 'check_data' has no attribute {name!r}")


def settings_from_config(path, stage_name, data_path, max_tiles=0):
    """tokenizer, template, max_length, num_image_tokens (tiled: per view), stage, allow_outside_images,
    image_aspect_ratio, max_tiles, tile, short side (images.short_side) of one stage of a train.py config (no weights
    loaded). The model is its init_from's when that is a folder of ours (what training loads), else its llm and
    towers; max_tiles as training sets it: the last stage up to this one that sets it, else init_from's; `max_tiles`
    (--max-tiles) overrides."""
    import recipes
    cfg = recipes.load_config(["--config", path])
    stages = recipes.stage_configs(cfg)
    if stage_name:
        matches = [s for s in stages if s["stage"] == stage_name]
        if not matches:
            raise ConfigError(f"--stage {stage_name}: {path} has no such stage; stages: "
                              + ", ".join(s["stage"] for s in stages))
        stage = matches[0]
    else:
        file_of = lambda s: s.get(f"data_{s['data']}") or ""  # noqa: E731
        same = [s for s in stages if file_of(s) and os.path.abspath(file_of(s)) == os.path.abspath(data_path)]
        stage = (same or stages)[-1]
    start = stage.get("init_from") or ""
    ours = os.path.isfile(os.path.join(start, "config.json")) if start else False
    if ours:
        with open(os.path.join(start, "config.json")) as f:
            ours = "num_image_tokens" in json.load(f)   # the original's layouts: the llm and towers, as before
    for key in ("llm", "tokenizer", "vision_tower", "vision_tower2"):   # (not a Hub download's error, later)
        recipes.coerce(key, stage[key], f"{path}: {key}", disk=True)
    if not ours and (not (stage["llm"] or stage["tokenizer"]) or not stage["vision_tower"]):
        raise ConfigError(f"--config {path}: names no llm (or tokenizer) and vision_tower: their tokenizer and image "
                          "token count are what the check needs")
    upto = stages[:stages.index(stage) + 1]   # each stage starts from the one before: 0 keeps its tiling
    tiles = max_tiles or next((s["max_tiles"] for s in reversed(upto) if s["max_tiles"]), 0)
    tokenizer, n_img, tiles, tile = model_settings({**stage, "max_tiles": tiles}, start if ours else None)
    return (tokenizer, stage["template"], stage["max_length"], n_img, stage["stage"],
            stage.get("allow_outside_images", False), stage["image_aspect_ratio"], tiles, tile,
            short_side_of(start if ours else stage["vision_tower"]))


def main(argv=None):
    p = Parser(prog="check_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=File(), help="LLaVA-format .json or .jsonl")
    p.add_argument("--image-folder", default=None, type=Folder(), help="check that every image opens (omit: skip "
                   "that check)")
    p.add_argument("--config", default=None, type=File(), help="a train.py config: tokenizer, template, lengths of a "
                   "stage")
    p.add_argument("--stage", default=None)
    p.add_argument("--model", default=None, type=Folder(), help="a saved model directory instead of --config")
    p.add_argument("--tokenizer", default=None, type=Model(), help="a tokenizer folder or Hub id")
    p.add_argument("--template", default="phi", type=Choice(*TEMPLATES))
    p.add_argument("--num-image-tokens", type=Int(1), default=None, help="with --tokenizer: tokens per image (tiled: "
                   "per view)")
    p.add_argument("--max-tiles", type=TRAIN["max_tiles"], default=None, metavar="N",
                   help="tiling, as training's max_tiles: each image a global view + a grid of at most N tiles chosen "
                   "from its shape, its tokens counted from its grid; with --tokenizer (0: off, the default) it needs "
                   "--tile-size; with --config / --model, N replaces their setting")
    p.add_argument("--tile-size", type=Int(1), default=None, metavar="PIXELS",
                   help="with --tokenizer and --max-tiles: the side of a tile, the vision tower's input (e.g. 384); "
                   "--config and --model read it from the tower's image processor")
    p.add_argument("--max-length", type=Int(1), default=None)
    p.add_argument("--image-aspect-ratio", type=Choice("square", "pad"), default=None,
                   help="as training preprocesses (default: --config's or --model's, else square)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths that are absolute or leave --image-folder through '..'")
    p.add_argument("--show", type=Int(0, also=(-1,)), default=50, help="problems to print (all are counted); -1: all")
    a = p.parse_args(argv)   # --help and every value checked here, before torch loads
    if a.model and not os.path.isfile(os.path.join(a.model, "config.json")):
        p.error(f"--model: {a.model} has no config.json: not a model folder saved by train.py (or convert.py)")
    if a.tile_size and (a.config or a.model):
        p.error("--tile-size: only with --tokenizer (--config and --model read the tile from the tower's image "
                "processor)")
    if a.tile_size and not a.max_tiles:
        p.error("--tile-size: the size of --max-tiles' tiles: give --max-tiles N too")
    if a.max_tiles and not (a.config or a.model or a.tile_size):
        p.error("--max-tiles: needs --tile-size (the vision tower's input side, e.g. 384) with --tokenizer")
    tokenizer, template, max_length, n_img, where = None, a.template, a.max_length, a.num_image_tokens, ""
    outside, aspect = a.allow_outside_images, "square"
    tiles, tile, short = a.max_tiles or 0, (a.tile_size, a.tile_size) if a.tile_size else None, None
    if a.config:
        (tokenizer, template, max_length, n_img, stage, in_config, aspect, tiles,
         tile, short) = settings_from_config(a.config, a.stage, a.data, tiles)
        where, outside = f" (stage {stage} of {a.config})", outside or in_config
    elif a.model:
        with open(os.path.join(a.model, "config.json")) as f:
            saved = json.load(f)
        if "num_image_tokens" not in saved:
            p.error(f"--model: {a.model} is not one of our model folders (its config.json has no num_image_tokens): "
                    "give --tokenizer and --num-image-tokens")
        tokenizer, n_img, tiles, tile = model_settings({"max_tiles": tiles}, a.model)   # 0 keeps the model's
        short = short_side_of(a.model)
        aspect = saved.get("image_aspect_ratio", aspect)
        train_cfg = os.path.join(a.model, "train_config.json")
        if os.path.isfile(train_cfg):
            with open(train_cfg) as f:
                saved = json.load(f)
            template, max_length = saved.get("template", template), max_length or saved.get("max_length")
    elif a.tokenizer:
        if n_img is None:
            p.error("--num-image-tokens is needed with --tokenizer (or use --config / --model)")
        from model import load_tokenizer
        tokenizer = load_tokenizer(a.tokenizer)
    from tqdm import tqdm
    from data import NOT_BAD, DataError, _where, check, read_records
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

    aspect = a.image_aspect_ratio or aspect
    report = check(records, a.image_folder, tokenizer, template, n_img or 0, max_length, outside, show,
                   len(records) >= PROGRESS_MIN, aspect, max_tiles=tiles, tile=tile, side=short)
    kinds = Counter(code for _, _, code, _ in report["problems"])
    listed, bad = ({i for i, _, c, _ in report["problems"] if c not in skip} for skip in ((), NOT_BAD))
    print(f"\n{a.data}{where}: {report['records']} records ({report['image']} with an image, "
          f"{report['text_only']} text-only); {len(listed)} with problems"
          + f" ({len(bad)} bad; a repeated id alone is not)" * (len(bad) < len(listed))
          + f"; {len(report['notes'])} with a leading system message (dropped, as the original does)")
    for kind, n in kinds.most_common():
        print(f"  {n:>7}  {kind}")
    if report["lengths"]:
        lens = percentiles(report["lengths"])
        print(f"tokens per sample incl. {f'{n_img} per image' if not tiles else 'the tokens of each image'} "
              f"({template} template): "
              + ", ".join(f"{k} {v}" for k, v in lens.items())
              + (f"; {report['over_max_length']} longer than max_length {max_length} (truncated)" if max_length
                 else ""))
    if tiles and a.image_folder:
        print(image_token_line(report["image_tokens"], n_img, tiles))
    elif tiles:
        print(f"tokens per image, tiled (max_tiles={tiles}, {n_img} per view): unknown without --image-folder (the "
              f"grids come from the images' shapes); each counted as {n_img}, fewer than any grid's")
    return 1 if bad else 0   # the module docstring's rule


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, OSError, ValueError) as e:   # a --config with bad values, a model folder that cannot be read
        print("\n".join(f"check_data.py: error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        sys.exit(2)

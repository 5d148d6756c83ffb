"""
Where an answer looks: for each generated token, a heatmap over each image of its attention to the image tokens
(averaged over the heads and layers chosen, mapped back onto the patch grid and upsampled onto the picture), its
top-k next-token probabilities, and its attention to the earlier text tokens. Drawn with Pillow into one PNG.

    python visualize.py --model out/demo/2_finetune --image demo/images/00002.png --prompt "What digit is shown?" --out vis.png
    python visualize.py --model DIR --image a.png --prompt "..." --layers -2: --heads 0,1 --top-k 8 --max-new-tokens 16

The answer is chat.py's (greedy by default; the same prompt, template and image preprocessing). The attention of a
token is that of the step that generated it: one eager forward over prompt + answer gives, at the position before
each answer token, the same attention rows and logits as the cached generation step. --layers / --heads take
indices or Python slices ("all", "-1", "0,2", "-4:"). The web demo (web_demo.py) draws the same panels.

An image's heatmap is drawn over its pixels as the tower saw them (in grey: CLIP's centre crop, the padded square of
image_aspect_ratio "pad"), so each patch's heat lands on the part of the picture that patch held.
A tiled model's image (max_tiles: a global view, then the tiles of its grid; connectors.tile_tokens lays out their
tokens) is drawn as two squares on one colour scale: the global view's heatmap on its patch grid; then, unless its
grid is 1x1, each tile's heatmap on its patch grid, the tiles placed as on the grid (borders in blue). Each is drawn
over that view's own pixels, as the tower saw them (in grey; the tiles' padding included), so no geometry is guessed:
the canvas is the one tiling cut. The newline tokens that end each row of views are in no heatmap (their weight is
neither an image's nor text's in the panel). Each image's token span comes from its own count (connectors.image_tokens
of its grid); when the prompt's image positions do not add up to its images' counts, trace() raises instead of
drawing heat over the wrong tokens.
"""
import argparse
import math
import sys

from settings import TEMPLATES, Choice, Image, Int, Model, Output, Parser

IMAGE_TOKEN_INDEX = -200   # data.IMAGE_TOKEN_INDEX


def pick(spec, n):
    """Indices of range(n) that `spec` names: "all", "3", "-1", "0,2", "-4:" (a Python slice)."""
    spec = str(spec).strip()
    if spec in ("", "all", ":"):
        return list(range(n))
    out = []
    for part in spec.split(","):
        if ":" in part:
            bounds = [int(x) if x.strip() else None for x in part.split(":")]
            out += list(range(n))[slice(*bounds)]
        else:
            k = int(part)
            if not -n <= k < n:
                raise ValueError(f"index {k} is out of range for {n}")
            out.append(k % n)
    if not out:
        raise ValueError(f"{spec!r} selects nothing of {n}")
    return sorted(set(out))


def spec(text):
    """--layers / --heads checked before torch loads: "all", or indices and slices ("-1", "0,2", "-4:")."""
    try:
        pick(text, 1 << 20) if str(text).strip() not in ("", "all", ":") else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, indices or slices like -1, 0,2 or -4:, got {text!r}") from None
    return text


def grid_of(n):
    """(rows, cols, skip) of n image tokens: a square patch grid, the same after a leading CLS token, else one row."""
    for skip in (0, 1):
        side = math.isqrt(n - skip)
        if side * side == n - skip and side > 0:
            return side, side, skip
    return 1, n, 0


def trace(model, tokenizer, prompt_ids, new_ids, images=None, image_grids=None, layers="all", heads="all",
          top_k=5):
    """One record per token of `new_ids` (what model.generate returned for `prompt_ids` [1, T], `images` and, tiled,
    `image_grids`): {"token", "heat": [per image: rows x cols tensor, tiled a dict (module docstring)], "views": [per
    image: its views' pixels, [views, 3, H, W]], "top": [(token, p)], "text": [(position, token, weight)]}."""
    import torch
    from connectors import views_of
    lm = model.language_model
    ids = torch.cat([prompt_ids, new_ids.to(prompt_ids.device).reshape(1, -1)], dim=1)
    before = getattr(lm.config, "_attn_implementation", None)
    lm.set_attn_implementation("eager")   # SDPA returns no attention weights
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=model.embed(ids, images, image_grids=image_grids), output_attentions=True)
    finally:
        if before:
            lm.set_attn_implementation(before)
    chosen = pick(layers, len(out.attentions))
    att = torch.stack([out.attentions[k][0].float() for k in chosen])   # layers x heads x T x T
    att = att[:, pick(heads, att.shape[1])].mean(dim=(0, 1))          # T x T
    is_image = (ids[0] == IMAGE_TOKEN_INDEX).tolist()
    blocks = image_blocks(model, [i for i, x in enumerate(is_image) if x], image_grids)
    views, first = [], 0   # each image's views as the tower saw them (drawings() draws the heat on them)
    for _, _, grid in blocks:
        n = 1 if grid is None else views_of(grid)
        views.append(images[first:first + n].detach().float().cpu() if torch.is_tensor(images) else None)
        first += n
    probs = out.logits[0].float().softmax(-1)
    records = []
    for j in range(new_ids.numel()):
        q = prompt_ids.shape[1] + j - 1   # the position whose output chose token j
        heat = [image_heat(att[q], block, per, grid, v) for (block, per, grid), v in zip(blocks, views)]
        p, top = probs[q].topk(min(top_k, probs.shape[-1]))
        text = [(i, tokenizer.decode([int(ids[0, i])]), float(att[q, i])) for i in range(q + 1) if not is_image[i]]
        records.append({"token": tokenizer.decode([int(ids[0, q + 1])]), "heat": heat, "views": views,
                        "top": [(tokenizer.decode([int(t)]), float(v)) for t, v in zip(top, p)], "text": text})
    return records


def image_blocks(model, image_pos, image_grids=None):
    """[(positions, tokens per view, grid or None)] per image: the prompt's image positions cut as the connector
    laid them out (untiled num_image_tokens each; tiled connectors.image_tokens of each grid). ValueError when the
    counts disagree: a heatmap is never drawn over positions that are not its image's."""
    from connectors import image_tokens
    per = getattr(model, "num_image_tokens", 0) or 0
    per = per if isinstance(per, int) else sum(per)
    if getattr(model, "max_tiles", 0) and image_grids is not None:
        grids = [tuple(g) for g in image_grids.tolist()]
    else:
        grids = [None] * (len(image_pos) // per if per else 0)
    counts = [image_tokens(per, g) for g in grids]
    if sum(counts) != len(image_pos):
        raise ValueError(f"{len(image_pos)} image positions in the prompt, but its images' layouts take "
                         f"{'+'.join(map(str, counts)) or 0}: no heatmap drawn")
    starts = [sum(counts[:k]) for k in range(len(counts))]
    return [(image_pos[s:s + n], per, g) for s, n, g in zip(starts, counts, grids)]


def image_heat(row, block, per, grid=None, views=None):
    """One image's share of an attention row: untiled, a rows x cols tensor on the patch grid (grid_of); tiled,
    {"global": the global view's, "tiles": the tiles' maps side by side as on the grid (rows * r, cols * c; None
    for a 1x1 grid), "grid": (rows, cols), "views": its pixels [views, 3, H, W]}. Newline tokens are left out."""
    import torch

    def view(positions):   # one view's tokens on its patch grid
        r, c, skip = grid_of(len(positions))
        return row[positions[skip:]].reshape(r, c)
    if grid is None:
        return view(block)
    rows, cols = grid
    tiles, start = [], per + 1   # the global view, its newline, then each row of tiles and a newline
    for _ in range(rows if rows * cols > 1 else 0):
        line = block[start:start + cols * per]
        tiles.append(torch.cat([view(line[c * per:(c + 1) * per]) for c in range(cols)], dim=1))
        start += cols * per + 1
    return {"global": view(block[:per]), "tiles": torch.cat(tiles) if tiles else None, "grid": grid, "views": views}


def overlay(picture, heat, size=160, scale=None):
    """The picture with `heat` (rows x cols, any scale; `scale` (low, high): that range, else its own) upsampled onto
    it in red, at size x size (a (width, height) pair: that)."""
    from PIL import Image as PILImage
    size = (size, size) if isinstance(size, int) else size
    base = picture.convert("L").convert("RGB").resize(size)   # grey, so the red reads on any picture
    h = heat.float()
    lo, hi = scale or (float(h.min()), float(h.max()))
    h = ((h - lo) / (hi - lo + 1e-12)).clamp(0, 1)
    mask = PILImage.fromarray((h * 255).byte().numpy(), "L").resize(size, PILImage.BILINEAR)
    red = PILImage.new("RGB", size, (255, 0, 0))
    return PILImage.composite(red, base, mask.point(lambda v: int(v * 0.6)))


def seen(pixels, low, high):
    """A view as the tower saw it ([3, H, W], normalised pixels): its grey levels, low..high stretched to 0-255."""
    from PIL import Image as PILImage
    g = ((pixels.float().mean(0) - low) / (high - low + 1e-12)).clamp(0, 1)
    return PILImage.fromarray((g * 255).byte().numpy(), "L")


def drawings(picture, heat, size=160, view=None):
    """One image's heatmaps, size x size each: untiled one, over `view` ([1, 3, H, W], the pixels the tower saw:
    a crop or a padded square lands where the tower's patches were), else over the picture; tiled (module docstring)
    the global view's, then unless the grid is 1x1 the tiles' placed on the grid (tile borders in blue), each over
    the view's own pixels, on one colour scale."""
    import torch
    from PIL import Image as PILImage, ImageDraw
    if not isinstance(heat, dict):
        grey = view[0].float().mean(0) if view is not None else None
        return [overlay(picture if view is None else seen(view[0], float(grey.min()), float(grey.max())), heat, size)]
    views, grey = heat["views"], heat["views"].float().mean(1)
    grey = float(grey.min()), float(grey.max())   # one grey scale for the image's views, as one for its heat
    maps = [heat["global"]] + [heat["tiles"]] * (heat["tiles"] is not None)
    every = torch.cat([m.flatten().float() for m in maps])
    scale = float(every.min()), float(every.max())
    out = [overlay(seen(views[0], *grey), heat["global"], size, scale)]
    if heat["tiles"] is not None:
        (rows, cols), (th, tw) = heat["grid"], views.shape[-2:]
        canvas = PILImage.new("L", (cols * tw, rows * th))
        for k, tile in enumerate(views[1:]):
            canvas.paste(seen(tile, *grey), ((k % cols) * tw, (k // cols) * th))
        k = size / max(canvas.size)
        w, h = max(1, round(canvas.width * k)), max(1, round(canvas.height * k))
        x, y = (size - w) // 2, (size - h) // 2
        box = PILImage.new("RGB", (size, size), "white")
        box.paste(overlay(canvas, heat["tiles"], (w, h), scale), (x, y))
        d = ImageDraw.Draw(box)
        for c in range(1, cols):
            d.line([(x + c * w // cols, y), (x + c * w // cols, y + h)], fill=(40, 80, 220))
        for r in range(1, rows):
            d.line([(x, y + r * h // rows), (x + w, y + r * h // rows)], fill=(40, 80, 220))
        out.append(box)
    return out


def panel(record, pictures, size=160, texts=8):
    """One token's picture: heatmaps over each image, the top-k bars, the most-attended earlier text tokens."""
    from PIL import Image as PILImage, ImageDraw
    if len(record["heat"]) != len(pictures):
        raise ValueError(f"{len(pictures)} pictures for the heatmaps of {len(record['heat'])} images")
    views = record.get("views") or [None] * len(pictures)
    drawn = [im for pic, heat, v in zip(pictures, record["heat"], views) for im in drawings(pic, heat, size, v)]
    width = max(size * max(len(drawn), 1), 2 * size) + 20
    height = 24 + (size + 8 if drawn else 0) + 16 * (len(record["top"]) + min(texts, len(record["text"])) + 2)
    im = PILImage.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 6), f"token {record['token']!r}", fill="black")
    y = 24
    for k, drawing in enumerate(drawn):
        im.paste(drawing, (10 + k * size, y))
    y += size + 8 if drawn else 0
    bar = width - 150

    def bars(title, rows, colour):
        nonlocal y
        d.text((10, y), title, fill="black")
        y += 16
        top = max([v for _, v in rows] + [1e-12])
        for name, v in rows:
            d.rectangle([120, y + 2, 120 + int(bar * v / top), y + 12], fill=colour)
            d.text((10, y), f"{name!r}"[:16], fill="black")
            d.text((124, y), f"{v:.3f}", fill="black")
            y += 16
    bars("next-token probability", record["top"], (80, 120, 220))
    text = sorted(record["text"], key=lambda r: -r[2])[:texts]
    bars("attention to earlier text", [(tok, w) for _, tok, w in text], (230, 140, 40))
    return im


def render(records, pictures, size=160, columns=4):
    """Every token's panel on one sheet, `columns` per row."""
    from PIL import Image as PILImage
    panels = [panel(r, pictures, size) for r in records]
    if not panels:
        return PILImage.new("RGB", (size, size), "white")
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    cols = min(columns, len(panels))
    sheet = PILImage.new("RGB", (w * cols, h * math.ceil(len(panels) / cols)), "white")
    for k, p in enumerate(panels):
        sheet.paste(p, ((k % cols) * w, (k // cols) * h))
    return sheet


def answer_and_trace(model, tokenizer, processor, template, question, pictures, history=(), max_new_tokens=32,
                     layers="all", heads="all", top_k=5, **generate_kwargs):
    """chat.py's answer to `question` after `history` (LLaVA turns; the images go with the first question) and its
    trace: (answer text, records)."""
    import torch
    from data import IMAGE_PLACEHOLDER, encode, image_inputs
    device = next(model.parameters()).device
    turns = list(history)
    if not turns and pictures:
        question = "\n".join([IMAGE_PLACEHOLDER] * len(pictures) + [question])   # as chat.py: "<image>\n<question>"
    turns.append({"from": "human", "value": question})
    images, grids, counts = image_inputs(pictures, processor, model.args.image_aspect_ratio, model.max_tiles,
                                         model.num_image_tokens)
    ids = encode(turns, template, tokenizer, counts, for_generation=True)["input_ids"][None].to(device)
    images, grids = (None if x is None else x.to(device) for x in (images, grids))
    generate_kwargs.setdefault("do_sample", False)
    new = model.generate(ids, torch.ones_like(ids), images=images, image_grids=grids, max_new_tokens=max_new_tokens,
                         **generate_kwargs)
    answer = tokenizer.decode(new[0], skip_special_tokens=True).strip()
    return answer, trace(model, tokenizer, ids, new[0], images, grids, layers, heads, top_k)


def main(argv=None):
    p = Parser(prog="visualize.py", description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Model(), help="a model directory (as chat.py) or a Hub id")
    p.add_argument("--image", action="append", default=[], type=Image(), help="a picture (repeat for several)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--out", required=True, type=Output(folder=False), help="the PNG to write")
    p.add_argument("--template", default=None, type=Choice(*TEMPLATES), help="chat template (default: the model's)")
    p.add_argument("--max-new-tokens", type=Int(1), default=16)
    p.add_argument("--layers", default="all", type=spec, help="layers to average: all, -1, 0,2, -4: (default all)")
    p.add_argument("--heads", default="all", type=spec, help="heads to average, as --layers (default all)")
    p.add_argument("--top-k", type=Int(1), default=5)
    a = p.parse_args(argv)
    from data import load_image
    from folders import model_template
    from model import load_pretrained
    model, tokenizer, processor = load_pretrained(a.model)
    try:
        template = model_template(a.model, model, a.template)
    except ValueError as e:
        p.error(str(e))
    pictures = [load_image(path) for path in a.image]
    try:
        answer, records = answer_and_trace(model.eval(), tokenizer, processor, template, a.prompt, pictures,
                                           max_new_tokens=a.max_new_tokens, layers=a.layers, heads=a.heads,
                                           top_k=a.top_k)
    except ValueError as e:   # a --layers / --heads outside the model
        p.error(str(e))
    render(records, pictures).save(a.out)
    print(f"ASSISTANT: {answer}\nwrote {a.out} ({len(records)} tokens)")
    return answer, records


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:
        print(f"visualize.py: error: {e}", file=sys.stderr)
        sys.exit(2)

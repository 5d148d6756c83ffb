"""Pictures: reading an image file safely (load_image), preprocessing it as training does (preprocess_image: the
processor's resize, or LLaVA's pad-to-square first), tiling (preprocess_views: a global view and the tiles of a grid
chosen from the image's shape; the geometry lives in modeling_tinyllava_nano.py, which saved folders carry).

    image = load_image("data/images/coco/1.jpg", aspect="square")   # PIL RGB, or DataError [image-...]
    pixels = preprocess_image(image, processor, "square")            # [3, H, W]
    views, grid = preprocess_views(image, processor, "square", 4)   # [1 + rows*cols (1x1: 1), 3, H, W], (rows, cols)
    pixels, grids, counts = image_inputs([image], processor, "square", 4, model.num_image_tokens)  # generate's inputs
"""
import os
import stat

import torch
from PIL import Image, ImageFile

from connectors import image_tokens
from modeling_tinyllava_nano import image_views
from records import DataError

# Over these limits an image is a bad sample (image-too-large): training images are far smaller (COCO 640 px, SAM
# 1500x2250); a 100 KB PNG may declare 30000x30000 (2.7 GB as RGB). PIL's limits: 89 Mpx warns, 179 Mpx raises.
MAX_IMAGE_PIXELS = 8192 * 8192
# "pad" puts the image on a max(w, h)-sided square, held as float32 by the processor: a 1x15000 image (147 bytes)
# took 3.5 GB, one padded to 8192 px takes 0.9 GB. (Resizing before padding would change every image's pixels.)
MAX_PAD_SIDE = 8192


def load_image(path, aspect="square", side=None) -> Image.Image:
    """`path` as RGB, or DataError: image-missing, -not-a-file (a directory, FIFO, device or socket: only a regular
    file is opened, since opening a FIFO waits for a writer forever), -too-large (over MAX_IMAGE_PIXELS; with aspect
    "pad" also a padded square over MAX_PAD_SIDE; "square" with `side`, the processor's short_side, also a resized
    image over MAX_IMAGE_PIXELS: square_problem; from the header, before decoding), -truncated (never grey),
    -unreadable."""
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # whoever set it
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _NotAFile(next((what for test, what in NOT_REGULAR.items() if test(mode)), "not a regular file")
                            + ", not a regular file")
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, over images.MAX_IMAGE_PIXELS")
            problem = _pad_problem(*im.size) if aspect == "pad" else square_problem(*im.size, side)
            if problem:
                raise Image.DecompressionBombError(problem)
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - whatever a decoder throws at a bad file, it is this file's problem
        code = ("image-missing" if isinstance(e, (FileNotFoundError, NotADirectoryError)) else
                "image-not-a-file" if isinstance(e, (IsADirectoryError, _NotAFile)) else
                "image-too-large" if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)) else
                "image-truncated" if "truncated" in str(e).lower() else "image-unreadable")
        raise DataError(f"cannot read image {path}: {e}", code) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


class _NotAFile(OSError):
    pass


NOT_REGULAR = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
               stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def _pad_problem(w, h):   # why "pad" refuses a w x h image, or None
    if max(w, h) > MAX_PAD_SIDE:
        return (f"a {w}x{h} image cannot be padded: its {max(w, h)}x{max(w, h)} square is over images.MAX_PAD_SIDE = "
                f"{MAX_PAD_SIDE}")


def short_side(processor):
    """The side a processor resizes an image's short side to, keeping its aspect ratio, before the centre crop
    (CLIP's and DINOv2's size={"shortest_edge": S}); None for one that resizes to a fixed size (SigLIP)."""
    size = getattr(processor, "size", None)   # a dict, or transformers 5's SizeDict
    side = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    return side if getattr(processor, "do_resize", True) else None


def square_problem(w, h, side):
    """Why "square" refuses a w x h image whose short side a processor resizes to `side` (None: fine). The long
    side grows with it, before the crop: a 1x15000 image became 224 x 3,360,000 pixels (7.8 GB, 27 s, one image)."""
    long = max(w, h) * side // max(1, min(w, h)) if side else 0
    if side and side * long > MAX_IMAGE_PIXELS:
        return (f"a {w}x{h} image resized to {side} px on its short side would be {side}x{long} pixels, over "
                f"images.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS} (crop it, or leave it out)")
    return None


def preprocess_image(image: Image.Image, processor, aspect="square") -> torch.Tensor:
    """PIL image -> (3, H, W) float tensor. "square": the processor's own resize/crop (TinyLLaVA's default;
    DataError when a short-side resize would make it over MAX_IMAGE_PIXELS); "pad": LLaVA's expand2square first,
    centring the image on a square canvas filled with the mean colour (DataError when that square's side would exceed
    MAX_PAD_SIDE)."""
    if aspect == "square" and (problem := square_problem(*image.size, short_side(processor))):
        raise DataError(problem, "image-too-large")   # a picture from memory (chat, evaluate); files: load_image
    if aspect == "pad":
        (w, h), side = image.size, max(image.size)
        if _pad_problem(w, h):
            raise DataError(_pad_problem(w, h), "image-too-large")
        fill = tuple(int(255 * m) for m in processor.image_mean)  # SigLIP -> (127,127,127), CLIP -> (122,116,104)
        canvas = Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    elif aspect != "square":
        raise ValueError(f"unknown image_aspect_ratio {aspect!r}; valid: square, pad")
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def preprocess_views(image: Image.Image, processor, aspect="square", max_tiles=0):
    """Tiling: (Tensor[views, 3, H, W], (rows, cols)): the global view (preprocess_image's pixels), then the tiles of
    the grid choose_grid picks for the image's shape among those of at most max_tiles tiles, row by row (none for a
    1x1 grid). max_tiles=0: ([1, 3, H, W], None)."""
    pixels = preprocess_image(image, processor, aspect)
    return image_views(image, pixels, processor, max_tiles) if max_tiles else (pixels[None], None)


def image_inputs(pictures, processor, aspect="square", max_tiles=0, per_view=0):
    """PIL images -> (pixels [n or views, 3, H, W], image_grids LongTensor[n, 2] or None, [tokens of each image]),
    what model.generate and encode take for them (chat.py, evaluate.py, the web demo)."""
    if not pictures:
        return None, None, []
    views = [preprocess_views(p, processor, aspect, max_tiles) for p in pictures]
    grids = torch.tensor([g for _, g in views]) if max_tiles else None
    return torch.cat([v for v, _ in views]), grids, [image_tokens(per_view, g) for _, g in views]

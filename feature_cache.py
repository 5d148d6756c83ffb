"""A frozen tower's outputs per image on disk, computed once and read by the dataset in place of the pixels
(train.py's feature_cache setting; model.FeatureCache is this class).

    cache = FeatureCache("cache/", model, processor)
    cache.fill(model, ["a.jpg", "b.jpg"], "data/images")   # -> (computed, unreadable)
    cache.load("data/images", "a.jpg")   # tower outputs [tokens, D] (MoF: a pair; tiled: ([views, ...], grid)), None
"""
import hashlib
import json
import os

import torch
from safetensors.torch import load_file

from folders import write_file
from images import DataError, load_image, preprocess_views, short_side


class FeatureCache:
    """A frozen tower's outputs per image on disk: computed once (fill), then read by the dataset in place of the
    pixels, across epochs, stages and runs. The folder is named by a fingerprint of everything the features
    depend on (the tower's weights, feature layer and selection, the image processor, aspect ratio and dtype), so
    any change starts a fresh one; an entry is keyed by the image's path, size and mtime. One safetensors file per
    image, written to a temp name and renamed: safe with several ranks writing and with a crash mid-write. Tiled
    (max_tiles), an entry holds every view's outputs and the image's grid."""

    def __init__(self, root, model, processor):
        h = hashlib.sha256()
        for k, v in sorted(model.vision_tower.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        a = model.args
        h.update(json.dumps([a.vision_feature_layer, a.vision_feature_select_strategy, a.legacy_patch_drop,
                             a.image_aspect_ratio, processor.to_dict(), str(model.vision_tower.dtype)]
                            + [a.max_tiles] * bool(a.max_tiles), sort_keys=True, default=str).encode())
        self.dir = os.path.join(root, h.hexdigest()[:20])
        self.processor, self.aspect, self.max_tiles = processor, a.image_aspect_ratio, a.max_tiles
        self.side = short_side(processor)

    def path(self, image_folder, image):
        st = os.stat(os.path.join(image_folder, image))
        key = hashlib.sha1(f"{image}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return os.path.join(self.dir, key[:2], key + ".safetensors")

    def load(self, image_folder, image):
        """The cached tower outputs (a tensor, or a pair for MoF; tiled: (those of every view, the grid)), or None
        when the image is not cached."""
        try:
            path = self.path(image_folder, image)
        except OSError:
            return None
        if not os.path.isfile(path):
            return None
        feats = load_file(path)
        grid = feats.pop("grid", None)
        feats = feats["0"] if len(feats) == 1 else (feats["0"], feats["1"])
        return feats if not self.max_tiles else (feats, tuple(grid.tolist()))

    @torch.no_grad()
    def fill(self, model, images, image_folder, batch_size=32, rank=0, world=1, device=None):
        """Compute and store the features of every image in `images` not cached yet (this rank's share).
        Unreadable images are left out (the dataset's bad-sample policy meets them). Returns (computed, failed)."""
        todo = []
        for image in sorted(set(images))[rank::world]:
            try:
                if not os.path.isfile(self.path(image_folder, image)):
                    todo.append(image)
            except OSError:
                pass   # missing image: the dataset reports it
        done, failed, tower, was_training = 0, 0, model.vision_tower, model.vision_tower.training
        tower.eval()
        for i in range(0, len(todo), batch_size):
            names, pixels, grids = [], [], []
            for image in todo[i:i + batch_size]:
                try:
                    picture = load_image(os.path.join(image_folder, image), self.aspect, self.side)
                    views, grid = preprocess_views(picture, self.processor, self.aspect, self.max_tiles)
                    names.append(image)
                    pixels.append(views)
                    grids.append(grid)
                except DataError:
                    failed += 1
            if not names:
                continue
            feats = tower(torch.cat(pixels).to(device or next(tower.parameters()).device))
            feats = feats if isinstance(feats, tuple) else (feats,)
            start = 0
            for image, views, grid in zip(names, pixels, grids):
                path, end = self.path(image_folder, image), start + len(views)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                entry = {str(k): (f[start] if grid is None else f[start:end]).cpu().contiguous()
                         for k, f in enumerate(feats)}
                write_file(path, entry if grid is None else {**entry, "grid": torch.tensor(grid)})
                start, done = end, done + 1
        tower.train(was_training)
        return done, failed

"""
tinyllava-nano as a transformers model. model.save_pretrained copies this file (and connectors.py, which it imports,
as modeling_connectors.py) into every folder it writes and config.json's auto_map names it, so transformers alone
loads the folder:

    from transformers import AutoModelForCausalLM, AutoProcessor
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)   # or: import model (the repo's)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": pil_image}, {"type": "text", "text": "What?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs)                         # greedy, EOS and max_new_tokens from generation_config.json
    print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    # batches: processor(images=..., text=prompts, padding=True, padding_side="left"); training's exact pixels: an
    # image processor loaded with backend="pil" (transformers 5 prefers torchvision's where it is installed)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)   # alone: no code runs. Without the
    # flag transformers asks "run the custom code?": it reads config.json first, whose AutoConfig is this file

Images go in as they did in training: the processor tokenizes the text on each side of "<image>" separately (the
original's tokenizer_image_token) and puts the image's tokens' worth of the sentinel id -200 between them
(num_image_tokens; tiled, image_tokens of its grid); the model writes the connector's output into those positions.
So the ids are training's ids exactly, with no token added to the tokenizer. A tiled folder (max_tiles) gets each
image as a global view and the tiles of its grid (choose_grid), `image_grids` beside `pixel_values`. Also reads the original's release layout (model_type "tinyllava", convert.py to-tinyllava).
Imports only torch, transformers and connectors.py (copied beside it as modeling_connectors.py; the repository's
module when imported there).
"""
import torch
import torch.nn as nn
from transformers import (AutoConfig, AutoModelForCausalLM, BatchFeature, CLIPVisionConfig, CLIPVisionModel,
                          Dinov2Config, Dinov2Model, GenerationMixin, PretrainedConfig, PreTrainedModel,
                          ProcessorMixin, SiglipVisionConfig, SiglipVisionModel)
from transformers.configuration_utils import SubConfigSpec

try:
    from PIL import Image   # what the image processors need anyway ("pad" images)
except ImportError:
    Image = None
try:
    from .modeling_connectors import build_connector, image_tokens   # connectors.py, copied beside this file
except ImportError:   # the repository's own module
    from connectors import build_connector, image_tokens

IMAGE_TOKEN_INDEX = -200   # data.IMAGE_TOKEN_INDEX
IMAGE_PLACEHOLDER = "<image>"
# model_type in the tower's config.json -> (class, config class, has a CLS token first)
TOWERS = {
    "clip": (CLIPVisionModel, CLIPVisionConfig, True),
    "clip_vision_model": (CLIPVisionModel, CLIPVisionConfig, True),
    "siglip": (SiglipVisionModel, SiglipVisionConfig, False),
    "siglip_vision_model": (SiglipVisionModel, SiglipVisionConfig, False),
    "dinov2": (Dinov2Model, Dinov2Config, True),
}


def tower_kind(model_type):
    if model_type not in TOWERS:
        raise ValueError(f"vision tower model_type {model_type!r} is not supported; valid: {sorted(TOWERS)}")
    return TOWERS[model_type]


def tower_tokens(patch_size, has_cls, image_size, strategy, legacy_patch_drop):
    tokens = (image_size[0] // patch_size) * (image_size[1] // patch_size) + int(has_cls)
    return tokens - int(strategy == "patch" and (has_cls or legacy_patch_drop))


def image_size(processor):
    """(H, W) of the image processor's output: the crop if it crops, else the resize target."""
    s = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    s = dict(s)
    if "height" in s:
        return s["height"], s["width"]
    return s["shortest_edge"], s["shortest_edge"]


# ---- Tiling (ModelArgs.max_tiles > 0): a grid of tower-sized tiles chosen from the image's shape, + a global view
def choose_grid(width, height, tile, max_tiles):
    """(rows, cols) for a width x height image, among every grid of at most max_tiles tiles of tile = (H, W) pixels:
    LLaVA-NeXT's select_best_resolution. Each grid's canvas (cols*W, rows*H) holds the image scaled to fit, keeping
    its aspect ratio; the grid that keeps the most of the image's pixels wins (scaled-down pixels lost, scaling up
    gains nothing), then the one with the least padding; ties keep the fewer rows, then fewer columns."""
    best, best_key = (1, 1), None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            w, h = cols * tile[1], rows * tile[0]
            scale = min(w / width, h / height)
            kept = min(max(1, min(w, int(width * scale))) * max(1, min(h, int(height * scale))), width * height)
            key = (kept, -(w * h - kept))
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
    return best


def tile_images(image, grid, tile, fill):
    """The tiles of a PIL image on `grid`, row by row: the image scaled (bicubic, keeping its aspect ratio) to fit the
    grid's canvas, centred on it, the rest `fill`, cut into tile = (H, W) pieces."""
    (rows, cols), (th, tw) = grid, tile
    cw, ch = cols * tw, rows * th
    scale = min(cw / image.width, ch / image.height)
    w, h = max(1, min(cw, round(image.width * scale))), max(1, min(ch, round(image.height * scale)))
    canvas = Image.new("RGB", (cw, ch), fill)
    canvas.paste(image.convert("RGB").resize((w, h), Image.BICUBIC), ((cw - w) // 2, (ch - h) // 2))
    return [canvas.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)) for r in range(rows) for c in range(cols)]


def mean_colour(processor):
    """The processor's mean as 0-255 RGB: the padding colour (SigLIP (127, 127, 127), CLIP (122, 116, 104))."""
    return tuple(int(255 * m) for m in processor.image_mean)


def image_views(image, global_view, processor, max_tiles):
    """(pixels [views, 3, H, W], (rows, cols)) of a PIL image: `global_view` (the image preprocessed as without
    tiling) first, then its tiles unless the grid is 1x1 (the tile would be the global view again)."""
    tile = image_size(processor)
    grid = choose_grid(image.width, image.height, tile, max_tiles)
    if grid == (1, 1):
        return global_view[None], grid
    tiles = processor(images=tile_images(image, grid, tile, mean_colour(processor)), return_tensors="pt")
    return torch.cat([global_view[None], tiles["pixel_values"]]), grid


def truncate_tower(hf_tower, feature_layer):
    """Drop every encoder layer after `feature_layer` and the final norm / pooling head, so they never run.
    hidden_states[k] of an L-layer encoder is the output of its k-th layer (0 = embeddings; -2 = L-1)."""
    layers = hf_tower.encoder.layers if hasattr(hf_tower.encoder, "layers") else hf_tower.encoder.layer
    n = len(layers)
    keep = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
    if not 0 <= keep <= n:
        raise ValueError(f"vision_feature_layer={feature_layer} is out of range for a {n}-layer tower")
    del layers[keep:]
    for name in ("post_layernorm", "layernorm"):   # SigLIP/CLIP, DINOv2: applied after the last layer
        if isinstance(getattr(hf_tower, name, None), nn.LayerNorm):
            setattr(hf_tower, name, nn.Identity())
    if getattr(hf_tower, "use_head", False):       # SigLIP attention-pooling head
        hf_tower.use_head = False
        del hf_tower.head
    return hf_tower


class VisionTower(nn.Module):
    """One HF vision model (or two for MoF) truncated at the feature layer; returns the selected tokens.
    The single child `_vision_tower` keeps the original's key names."""

    def __init__(self, towers, has_cls, strategy="patch", legacy_patch_drop=False):
        super().__init__()
        self._vision_tower = towers[0] if len(towers) == 1 else nn.ModuleDict({"clip": towers[0], "dinov2": towers[1]})
        self.has_cls, self.strategy, self.legacy_patch_drop = has_cls, strategy, legacy_patch_drop
        if strategy not in ("patch", "cls_patch"):
            raise ValueError(f"vision_feature_select_strategy must be 'patch' or 'cls_patch', got {strategy!r}")

    @property
    def towers(self):
        t = self._vision_tower
        return [t["clip"], t["dinov2"]] if isinstance(t, nn.ModuleDict) else [t]

    def select(self, feats, has_cls):
        drop = self.strategy == "patch" and (has_cls or self.legacy_patch_drop)
        return feats[:, 1:] if drop else feats

    def forward(self, images):
        images = images.to(self.dtype)
        outs = [self.select(t(pixel_values=images).last_hidden_state, c) for t, c in zip(self.towers, self.has_cls)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def num_tokens(self, image_size):
        """Tokens per image after selection: one per patch (+ CLS). Counted, not run, so it also works on
        ZeRO-3-partitioned weights."""
        n = [tower_tokens(t.config.patch_size, c, image_size, self.strategy, self.legacy_patch_drop)
             for t, c in zip(self.towers, self.has_cls)]
        return n[0] if len(n) == 1 else tuple(n)

    @property
    def hidden_size(self):
        return [t.config.hidden_size for t in self.towers]

    @property
    def dtype(self):
        return next(self.parameters()).dtype


def make_vision_tower(towers, has_cls, feature_layer, strategy="patch", legacy_patch_drop=False):
    """VisionTower from HF vision models (two for MoF: CLIP, DINOv2), cut after the feature layer."""
    if len(towers) == 2 and not (towers[0].config.model_type.startswith("clip")
                                 and towers[1].config.model_type == "dinov2"):
        raise ValueError("MoF needs vision_tower = a CLIP model and vision_tower2 = a DINOv2 model")
    return VisionTower([truncate_tower(t, feature_layer) for t in towers], has_cls, strategy, legacy_patch_drop)


def splice(embedding, input_ids, image_features):
    """Text embeddings of input_ids with the image features (N_img, tokens, D), or all images' tokens as one
    (tokens, D) tensor (tiling), written, in batch order, into the IMAGE_TOKEN_INDEX positions."""
    is_image = input_ids == IMAGE_TOKEN_INDEX
    embeds = embedding(input_ids.masked_fill(is_image, 0))
    n_slots = int(is_image.sum())
    n_feats = 0 if image_features is None else image_features.shape[:-1].numel()
    if n_slots != n_feats:
        per = "" if image_features is None or image_features.dim() < 3 else f" ({image_features.shape[1]} per image)"
        raise ValueError(f"{n_slots} image positions in input_ids but {n_feats} image feature vectors{per}: "
                         "data and model disagree on num_image_tokens")
    if n_feats:
        feats = image_features.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats)   # row-major = batch order
    return embeds


def encode_text(tokenizer, text, num_image_tokens, add_special_tokens=True):
    """Training's token ids of `text` (data.encode's): each side of "<image>" tokenized on its own, the BOS the
    tokenizer adds to all but the first dropped, num_image_tokens sentinels for each "<image>" (a list: the k-th
    image's count, tiling)."""
    ids, counts = [], num_image_tokens if isinstance(num_image_tokens, (list, tuple)) else None
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            ids += [IMAGE_TOKEN_INDEX] * (counts[k - 1] if counts is not None else num_image_tokens)
        enc = tokenizer(chunk, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        chunk_ids = list(enc["input_ids"])
        if k > 0 and chunk_ids and chunk_ids[0] == tokenizer.bos_token_id and tuple(enc["offset_mapping"][0]) == (0, 0):
            chunk_ids = chunk_ids[1:]   # an added BOS, not a literal one in the text
        ids += chunk_ids
    return ids


class TinyLlavaNanoConfig(PretrainedConfig):
    """config.json of a stage folder: ModelArgs' fields, the LLM's config, the towers' configs."""
    model_type = "tinyllava_nano"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    text_config: dict | PretrainedConfig | None = None
    vision_configs: list | None = None
    connector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "patch"
    legacy_patch_drop: bool = False
    image_aspect_ratio: str = "square"
    num_queries: int = 128
    num_resampler_layers: int = 3
    num_image_tokens: int = 0   # per image; tiled: per view (connectors.image_tokens gives an image's count)
    max_tiles: int = 0          # 0: no tiling; else each image is a global view + a grid of at most this many tiles
    image_token_index: int = IMAGE_TOKEN_INDEX

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):   # a saved auto_map never counts
            self.text_config = {k: v for k, v in self.text_config.items() if k != "auto_map"}
        if not kwargs.get("attn_implementation"):
            kwargs.pop("attn_implementation", None)   # ours saves "" for the default
        super().__post_init__(**kwargs)


class TinyLlavaConfig(TinyLlavaNanoConfig):
    """The original's config.json (TinyLLaVA Factory's TinyLlavaConfig fields), read as ours: its 'patch' always
    drops the first token, its towers are one vision_config (+ vision_config2 for MoF, which only ours writes)."""
    model_type = "tinyllava"
    vision_config: dict | None = None
    vision_config2: dict | None = None
    connector_type: str = "mlp2x_gelu"

    def __post_init__(self, **kwargs):
        vc = self.vision_config or {}
        self.vision_configs = [vc.get("vision_config", vc)] + ([self.vision_config2] if self.vision_config2 else [])
        self.connector, self.legacy_patch_drop = self.connector_type, True
        self.num_queries, self.num_resampler_layers = self.num_queries or 128, self.num_resampler_layers or 3
        super().__post_init__(**kwargs)


class TinyLlavaNanoForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """language_model (any transformers causal LM) + vision_tower + connector; the original's key names."""
    config_class = TinyLlavaNanoConfig
    base_model_prefix = ""
    _supports_sdpa = True
    _supports_flash_attn = True
    # the original's layout keeps what our towers cut away (layers after the feature layer, post-norm, head)
    _keys_to_ignore_on_load_unexpected = [r"^vision_tower\._vision_tower\."]

    def __init__(self, config):
        super().__init__(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        kinds = [tower_kind(vc["model_type"]) for vc in config.vision_configs]
        self.vision_tower = make_vision_tower([cls(config_cls.from_dict(vc)) for (cls, config_cls, _), vc in
                                               zip(kinds, config.vision_configs)], [k[2] for k in kinds],
                                              config.vision_feature_layer, config.vision_feature_select_strategy,
                                              config.legacy_patch_drop)
        widths = self.vision_tower.hidden_size
        self.connector = build_connector(config.connector, widths[0], self.language_model.get_input_embeddings()
                                         .embedding_dim, vision_dim2=widths[-1], num_queries=config.num_queries,
                                         num_layers=config.num_resampler_layers, init="torch",
                                         newline=bool(config.max_tiles))
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # the original's CLIP/SigLIP keys have a `vision_model.` level that transformers 5's towers do not
        kwargs.setdefault("key_mapping", {r"^(vision_tower\._vision_tower\.(?:clip\.)?)vision_model\.": r"\1"})
        return super().from_pretrained(*args, **kwargs)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def embed(self, input_ids, pixel_values=None, image_grids=None):
        feats = None if pixel_values is None else self.connector(self.vision_tower(pixel_values), image_grids)
        return splice(self.get_input_embeddings(), input_ids, feats)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, inputs_embeds=None,
                image_grids=None, **kwargs):
        """The LLM's output (logits, and loss for `labels`) on the text embeddings with the images spliced in
        (tiled: pixel_values holds every image's views, image_grids one (rows, cols) per image)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grids)
        if labels is not None:
            labels = labels.masked_fill(labels < 0, -100)   # image positions never take a loss
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                                   **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_grids=None, **kwargs):
        """Prompt + new tokens (image positions in the prompt read as the pad id), from LEFT-padded prompts."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts (the processor's padding_side='left')")
        config = kwargs.pop("generation_config", None) or self.generation_config
        config = type(config).from_dict(config.to_dict())   # a copy
        kwargs = config.update(**kwargs)   # one config (the folder's + this call's): generate() deprecates both
        new = self.language_model.generate(inputs_embeds=self.embed(input_ids, pixel_values, image_grids),
                                           attention_mask=attention_mask, generation_config=config, **kwargs)
        pad = config.pad_token_id or 0
        return torch.cat([input_ids.masked_fill(input_ids < 0, pad), new.to(input_ids.device)], dim=1)


class TinyLlavaForConditionalGeneration(TinyLlavaNanoForConditionalGeneration):
    config_class = TinyLlavaConfig


class TinyLlavaNanoProcessor(ProcessorMixin):
    """Image processor + tokenizer + the training chat template. Text is tokenized as training did (each side of
    "<image>" on its own, the BOS of all but the first side dropped), each "<image>" becomes its image's count of
    sentinels; images are preprocessed as in training (`pad`: centred on a square of the mean colour first; tiled
    (max_tiles): that global view and the tiles, `image_grids` one (rows, cols) per image)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=0,
                 image_aspect_ratio="square", max_tiles=0, **kwargs):
        self.num_image_tokens, self.image_aspect_ratio = num_image_tokens, image_aspect_ratio
        self.max_tiles = max_tiles
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def encode(self, text, add_special_tokens=True, counts=None):
        return encode_text(self.tokenizer, text, self.num_image_tokens if counts is None else counts,
                           add_special_tokens)

    def pixels(self, image):
        """(pixels [views, 3, H, W], (rows, cols) or None without tiling) of one image."""
        if isinstance(image, str):   # a path, an http(s) URL or base64 ({"type": "image", "path" | "url": ...})
            from transformers.image_utils import load_image
            image = load_image(image)
        image = original = image.convert("RGB")
        if self.image_aspect_ratio == "pad":
            w, h = image.size
            canvas = Image.new("RGB", (max(w, h),) * 2, mean_colour(self.image_processor))
            canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            image = canvas
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        if not self.max_tiles:
            return pixels[None], None
        return image_views(original, pixels, self.image_processor, self.max_tiles)

    def __call__(self, images=None, text=None, videos=None, audio=None, padding=False, return_tensors=None,
                 add_special_tokens=True, padding_side=None, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        flat, todo = [], [images]
        while todo:   # an image, a list of them, or one list per text (apply_chat_template)
            x = todo.pop(0)
            if isinstance(x, (list, tuple)):
                todo[:0] = list(x)
            elif x is not None:
                flat.append(x)
        slots = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        if slots != len(flat):
            raise ValueError(f"{slots} {IMAGE_PLACEHOLDER} in the text but {len(flat)} images")
        views = [self.pixels(im) for im in flat]
        counts = [image_tokens(self.num_image_tokens, grid) for _, grid in views]
        bos, rows = self.tokenizer.bos_token, []
        for t in texts:   # rendered by the chat template, a text may open with the BOS already
            n = t.count(IMAGE_PLACEHOLDER)
            rows.append(self.encode(t, add_special_tokens and not (bos and t.startswith(bos)), counts[:n]))
            counts = counts[n:]
        width = max(map(len, rows), default=0) if padding or (return_tensors and len(rows) > 1) else 0
        left = (padding_side or self.tokenizer.padding_side) == "left"
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        fill = lambda r, x: [x] * (width - len(r)) + r if left else r + [x] * (width - len(r))  # noqa: E731
        data = {"input_ids": [fill(r, pad) for r in rows], "attention_mask": [fill([1] * len(r), 0) for r in rows]}
        if isinstance(text, str) and not return_tensors:
            data = {k: v[0] for k, v in data.items()}
        if flat:
            data["pixel_values"] = torch.cat([pixels for pixels, _ in views])
        if flat and self.max_tiles:
            data["image_grids"] = torch.tensor([grid for _, grid in views])
        return BatchFeature(data, tensor_type=return_tensors)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """pipeline("image-text-to-text")'s decoding: the image sentinels (negative ids) are no tokens."""
        rows = generated_outputs.tolist() if hasattr(generated_outputs, "tolist") else list(generated_outputs)
        rows = rows if rows and isinstance(rows[0], (list, tuple)) else [rows]
        return self.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, **kwargs):
        return [self.decode(s, **kwargs) for s in sequences]

    def decode(self, ids, **kwargs):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tokenizer.decode([i for i in ids if i >= 0], **kwargs)

"""
The model: any Hugging Face causal LM + a vision tower (CLIP, SigLIP, DINOv2, or CLIP+DINOv2 "MoF"),
joined by a connector from connectors.py. The transformer blocks are Hugging Face's; the glue is ours.

    from model import ModelArgs, build_model, save_pretrained, load_pretrained
    model, tokenizer, processor = build_model(ModelArgs(llm="microsoft/phi-2",
        vision_tower="google/siglip-so400m-patch14-384", connector="mlp2x_gelu"))
    out = model(input_ids, attention_mask, labels=labels, images=pixel_values)   # out["loss"]
    new_tokens = model.generate(input_ids, attention_mask, images=pixel_values, max_new_tokens=32)
    save_pretrained(model, tokenizer, processor, "out/run1", template="phi")   # self-contained, loads offline:
    model, tokenizer, processor = load_pretrained("out/run1")   # (a Hub id; the original's layouts: layouts.py)

How images get in: data.py expands each `<image>` into `model.num_image_tokens` copies of the sentinel id
IMAGE_TOKEN_INDEX (-200); `embed()` looks up the text embeddings and drops the connector's output into the
sentinel positions with one masked_scatter. Tiling (max_tiles > 0, off by default): each image is a global view plus
a grid of tower-sized tiles chosen from its shape (modeling_tinyllava_nano.choose_grid); every view goes through the
tower in one batch, and the connector lays an image's views out with a learned newline after each row
(connectors.tile_tokens), so an image takes connectors.image_tokens(num_image_tokens, grid) positions. `images`
holds only the pictures of the rows that have one, in batch order: text-only rows never run the tower (TinyLLaVA Factory feeds them a zero image; the one exception
is a trainable tower under ZeRO-3 / FSDP on a batch without pictures, see idle_images).

State-dict keys follow TinyLLaVA Factory (`language_model.*`, `vision_tower._vision_tower.*`,
`connector._connector.*`) so its checkpoints map onto ours (transformers 5 dropped the `vision_model.` level
inside CLIP/SigLIP vision models, the one difference a loader of the original's files has to undo).

A saved folder is also a transformers model (modeling_tinyllava_nano.py, copied in, holds the same tower, splice and
connectors): AutoModelForCausalLM / AutoModelForImageTextToText / AutoProcessor load it once this module is imported,
or anywhere with trust_remote_code=True; its chat template and generation_config.json are training's prompt and
evaluation's decoding (folders.py writes these; folders.save_adapter a LoRA stage as a PEFT adapter of that model).
load_pretrained reads every layout this project reads: ours, TinyLLaVA Factory's (layouts.py reads them into our
config and weights) and, for evaluate.py, a transformers Llava as itself. It never imports a folder's .py.
"""
import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save_model as save_safetensors
from transformers import (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM,
                          AutoModelForImageTextToText, AutoProcessor)

from connectors import build_connector
from data import IGNORE_INDEX
from feature_cache import FeatureCache  # noqa: F401 (model.FeatureCache, as before)
from folders import (auto_load, auto_map, check_finite, hf_files, load_image_processor, load_tokenizer, read_json,
                     resolve, save_files, write_file)
import layouts
from modeling_tinyllava_nano import VisionTower  # noqa: F401 (model.VisionTower, as before)
from modeling_tinyllava_nano import (TinyLlavaNanoConfig, TinyLlavaNanoForConditionalGeneration,  # noqa: F401
                                     TinyLlavaNanoProcessor, image_size, make_vision_tower, splice, tower_kind,
                                     tower_tokens)

AutoConfig.register("tinyllava_nano", TinyLlavaNanoConfig, exist_ok=True)   # the Auto classes read our folders
for _auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(TinyLlavaNanoConfig, TinyLlavaNanoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(TinyLlavaNanoConfig, TinyLlavaNanoProcessor, exist_ok=True)


@dataclass
class ModelArgs:
    llm: str = ""                      # Hub id or local dir of any AutoModelForCausalLM
    tokenizer: str = ""                # default: the llm's (OpenELM: meta-llama/Llama-2-7b-hf, as the original)
    vision_tower: str = ""             # Hub id or local dir; kind from its config.json model_type: clip | siglip | dinov2
    vision_tower2: str = ""            # set -> MoF: vision_tower is CLIP, this is DINOv2, both see the same image
    connector: str = "mlp2x_gelu"      # identity | linear | mlp{N}x_gelu | qformer | resampler | mof_mlp | pixel_shuffle{S}_mlp{N}x_gelu
    vision_feature_layer: int = -2     # hidden_states index; later layers and the post-norm/head are removed, never run
    vision_feature_select_strategy: str = "patch"  # patch (drop the CLS token) | cls_patch (keep every token)
    legacy_patch_drop: bool = False    # True: 'patch' drops the first token even without CLS (original; SigLIP 729->728)
    image_aspect_ratio: str = "square"  # square (processor default) | pad; saved so evaluation preprocesses alike
    max_tiles: int = 0                 # 0: one view per image (the original); N: + a grid of <= N tower-sized tiles
    num_queries: int = 128             # qformer / resampler output tokens
    num_resampler_layers: int = 3      # resampler depth (the qformer keeps BERT-base's 12 layers)
    trust_remote_code: bool = False    # only for LLMs outside transformers (OpenELM); runs code from the Hub
    attn_implementation: str = ""      # "" = transformers default (sdpa) | eager | flash_attention_2
    dtype: str = "float32"             # weights as loaded: float32 | bfloat16 | float16 (train with bf16 autocast)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def count_image_tokens(args):
    """model.num_image_tokens for ModelArgs from configs and the image processor alone: no weights are loaded
    (check_data.py uses it on a training config)."""
    widths, counts = [], []
    size = image_size(load_image_processor(args.vision_tower))
    for path in [args.vision_tower] + ([args.vision_tower2] if args.vision_tower2 else []):
        _, config_cls, has_cls = tower_kind(auto_load(AutoConfig, path, "config").model_type)
        config = config_cls.from_pretrained(path)   # a CLIP/SigLIP checkpoint's vision_config
        widths.append(config.hidden_size)
        counts.append(tower_tokens(config.patch_size, has_cls, size, args.vision_feature_select_strategy,
                                   args.legacy_patch_drop))
    with torch.device("meta"):   # shapes only
        connector = build_connector(args.connector, widths[0], widths[0], vision_dim2=widths[-1],
                                    num_queries=args.num_queries, num_layers=args.num_resampler_layers)
    return connector.num_tokens(counts[0] if len(counts) == 1 else tuple(counts))


class TinyLlava(nn.Module):
    def __init__(self, language_model, vision_tower, connector, args, image_size):
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.connector = connector
        self.args = args
        self.image_size = image_size
        self.num_image_tokens = connector.num_tokens(vision_tower.num_tokens(image_size))   # tiled: per view
        self.max_tiles = args.max_tiles
        self.supervised_only_loss = True   # False: the full-logits loss (same value, more memory)
        self.chunked_loss = True           # False: the supervised positions' logits at once (same value, more memory)
        self.tower_no_grad = True          # False: a frozen tower still records autograd (bench.py's baseline)

    def encode_images(self, images=None, tower_features=None, image_grids=None):
        """(N_img, 3, H, W) -> (N_img, num_image_tokens, llm_hidden); tiled, every image's views (N_views, 3, H, W)
        and image_grids (N_img, 2) -> all images' tokens (sum of image_tokens, llm_hidden). A frozen tower runs
        without autograd; `tower_features` (its outputs, e.g. from a FeatureCache; a pair for MoF) skip it."""
        if tower_features is not None:
            feats = tower_features
        elif any(p.requires_grad for p in self.vision_tower.parameters()) or not self.tower_no_grad:
            feats = self.vision_tower(images)
        else:
            with torch.no_grad():
                feats = self.vision_tower(images)
        if self.max_tiles and image_grids is None:
            raise ValueError("a tiled model (max_tiles > 0) needs image_grids with its images")
        return self.connector(feats, image_grids if self.max_tiles else None)

    def embed(self, input_ids, images=None, image_features=None, tower_features=None, image_grids=None):
        """Text embeddings with the image features written into the IMAGE_TOKEN_INDEX positions."""
        if image_features is None and (images is not None or tower_features is not None):
            image_features = self.encode_images(images, tower_features, image_grids)
        return splice(self.language_model.get_input_embeddings(), input_ids, image_features)

    def forward(self, input_ids, attention_mask=None, labels=None, images=None, image_features=None,
                tower_features=None, image_grids=None):
        """Without labels: {"logits"}. With labels: {"loss", "loss_sum", "num_tokens"}, the loss being a
        cross-entropy summed over supervised tokens only (train.py divides by the step's total count)."""
        embeds = self.embed(input_ids, images, image_features, tower_features, image_grids)
        lm = self.language_model
        if labels is None:
            return {"logits": lm(inputs_embeds=embeds, attention_mask=attention_mask).logits}
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        head = lm.get_output_embeddings()   # None for remote-code models that tie by hand (OpenELM)
        if self.supervised_only_loss and head is not None:
            # Run the decoder, then the LM head only at the supervised positions: never builds the
            # [batch, length, vocab] logits (2048 x 256k floats per sample for Gemma).
            hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
            cap = getattr(lm.config, "final_logit_softcapping", None)   # Gemma-2 style heads
            hidden = hidden[:, :-1][keep]
            if self.chunked_loss and plain_linear(head):   # nor the [supervised tokens, vocab] ones
                loss_sum = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets[keep], cap,
                                                    max(1, LOSS_CHUNK // head.out_features), torch.is_grad_enabled())
            else:
                logits = head(hidden).float()
                logits = torch.tanh(logits / cap) * cap if cap else logits
                loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        else:
            logits = lm(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, :-1][keep].float()
            loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        if images is None and image_features is None and tower_features is None:
            loss_sum = loss_sum + 0.0 * self.idle_images()
        n = keep.sum()
        return {"loss": loss_sum / n.clamp(min=1), "loss_sum": loss_sum, "num_tokens": n}

    def idle_images(self):
        """A batch without pictures leaves the tower and connector out of the graph; this term (times 0 in the
        loss) gives every trainable parameter of theirs a zero gradient: DDP / ZeRO / FSDP ranks stay in step, and
        a text-only batch in a connector-only stage is a no-op instead of a "does not require grad" error. Plain
        weights are summed. Sharded ones (ZeRO-3, FSDP) exist only inside their module's forward, so there the
        modules run on a zero input (the connector on a zero tower output; a trainable tower on a zero image)."""
        params = [p for m in (self.vision_tower, self.connector) for p in m.parameters() if p.requires_grad]
        if not params:
            return 0.0
        if not any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in params):
            return sum(p.sum() for p in params)
        device, dtype = self.language_model.get_input_embeddings().weight.device, self.vision_tower.dtype
        grids = [(1, 1)] if self.max_tiles else None   # tiled: the newline takes part too
        if any(p.requires_grad for p in self.vision_tower.parameters()):
            return self.encode_images(torch.zeros(1, 3, *self.image_size, dtype=dtype, device=device),
                                      image_grids=grids).sum()
        n = self.vision_tower.num_tokens(self.image_size)
        feats = [torch.zeros(1, k, d, dtype=dtype, device=device)
                 for k, d in zip(n if isinstance(n, tuple) else (n,), self.vision_tower.hidden_size)]
        return self.connector(feats[0] if len(feats) == 1 else tuple(feats), grids).sum()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, images=None, image_grids=None, **kwargs):
        """Batched generation from LEFT-padded prompts with the KV cache; returns only the new tokens
        (HF's generate returns no prompt when it is given inputs_embeds alone)."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts (collate(..., padding_side='left'))")
        embeds = self.embed(input_ids, images, image_grids=image_grids)
        kwargs.setdefault("pad_token_id", self.language_model.generation_config.pad_token_id)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


LOSS_CHUNK = 2 ** 25   # logits computed at once by LinearCrossEntropy: 128 MiB of float32 (rows = this / vocab)


def plain_linear(head):
    """A head whose weight is an ordinary whole tensor: not LoRA-wrapped, quantised, ZeRO-3-partitioned (an empty
    placeholder outside the module's forward) or an FSDP DTensor, and with no hooks that a direct use would skip."""
    w = head.weight
    return (type(head) is nn.Linear and type(w.data) is torch.Tensor and w.numel() > 0
            and not head._forward_pre_hooks and not head._forward_hooks)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(softcap(hidden_i @ W.T + b), target_i), `chunk` rows at a time, so the [rows, vocab]
    logits never exist at once; each chunk's gradients (hidden, W, b) are computed in the forward and the backward
    only scales them (Liger-Kernel's fused linear cross-entropy, in plain torch). Equals head + F.cross_entropy up to
    float summation order (tests/test_perf.py)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cap, chunk, grads):
        need_h, need_w, need_b = (grads and n for n in ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s:s + chunk], targets[s:s + chunk]
            z = F.linear(h, weight, bias).float()
            if cap:
                t = torch.tanh(z / cap)
                z = t * cap
            lse = torch.logsumexp(z, -1)
            loss += (lse - z.gather(1, y[:, None])[:, 0]).sum()
            if need_h or need_w or need_b:
                g = z.sub_(lse[:, None]).exp_()          # softmax, in place of the logits
                g[torch.arange(len(y), device=g.device), y] -= 1
                if cap:
                    g *= 1 - t * t
                if need_h:
                    grad_h[s:s + chunk] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w.addmm_(g.T, h.float())           # accumulated in place, float32
                if need_b:
                    grad_b += g.sum(0)
        ctx.grads = grad_h, grad_w, grad_b   # not saved tensors: the backward hands them on, then they are gone
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):   # scales in place (no second vocabulary-sized buffer), so it runs once
        if ctx.grads is None:
            raise RuntimeError("LinearCrossEntropy's backward runs once (retain_graph is not supported)")
        (grad_h, grad_w, grad_b), ctx.grads = ctx.grads, None
        scale = lambda g, dtype=None: None if g is None else g.mul_(grad_loss).to(dtype or g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w, ctx.dtypes[0]), scale(grad_b, ctx.dtypes[1]), None, None, None, None


FUSED_GELU = True   # False: HF's own gelu_new, op for op (bench.py's re-created original loop sets it)


def fuse_gelu(module):
    """gelu_new (Phi, Phi-2) as one kernel. HF writes this tanh approximation of GELU as eight elementwise ops,
    each a tensor autograd keeps; F.gelu(approximate="tanh") is the same function (HF's GELUTanh: equal within
    float rounding, 2.4e-7 here) at 2.3x the speed forward and backward and a fraction of the memory. The saved
    config keeps "gelu_new", so the checkpoint is unchanged for every other reader."""
    from transformers.activations import GELUTanh, NewGELUActivation
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())


def _build(args, text_config=None, vision_configs=None, llm_kwargs=None, lm_weights=None):
    """Shared by build_model (weights from the Hub/dirs) and load_pretrained (architecture from saved configs,
    LLM weights handed over as a state dict so from_pretrained can still quantise them)."""
    dtype = DTYPES[args.dtype]
    attn = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if text_config is None:
        lm = AutoModelForCausalLM.from_pretrained(args.llm, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                                  **attn, **(llm_kwargs or {}))
    elif type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:   # remote code (OpenELM): no quantised reload
        lm = AutoModelForCausalLM.from_config(text_config, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                              **attn)
        missing, unexpected = lm.load_state_dict(lm_weights, strict=False)
        loaded = {p.data_ptr() for n, p in lm.named_parameters() if n in lm_weights}
        missing = [n for n in missing if lm.get_parameter(n).data_ptr() not in loaded]   # tied copies are fine
        if missing or unexpected:
            raise ValueError(f"saved LLM weights do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    else:   # from_pretrained with a state dict, so a quantization_config still applies (QLoRA after a stage)
        lm, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)].from_pretrained(
            None, config=text_config, state_dict=lm_weights, dtype=dtype, output_loading_info=True, **attn,
            **(llm_kwargs or {}))
        if info["missing_keys"] or info["unexpected_keys"]:
            raise ValueError(f"saved LLM weights do not fit its config: missing {sorted(info['missing_keys'])[:5]}, "
                             f"unexpected {sorted(info['unexpected_keys'])[:5]}")
    if FUSED_GELU:
        fuse_gelu(lm)
    paths = [args.vision_tower] + ([args.vision_tower2] if args.vision_tower2 else [])
    towers, has_cls = [], []
    for i, path in enumerate(paths):
        if vision_configs is None:
            cls, _, cls_token = tower_kind(auto_load(AutoConfig, path, "config").model_type)
            tower = cls.from_pretrained(path, dtype=dtype, **attn)
        else:
            cls, config_cls, cls_token = tower_kind(vision_configs[i]["model_type"])
            config = config_cls.from_dict(vision_configs[i])
            if args.attn_implementation:
                config._attn_implementation = args.attn_implementation
            # the plain constructor, not _from_config: under ZeRO-3 that would build partitioned (empty)
            # weights that load_state_dict below cannot fill; DeepSpeed partitions at prepare() instead
            tower = cls(config).to(dtype)
        towers.append(tower)
        has_cls.append(cls_token)
    vision = make_vision_tower(towers, has_cls, args.vision_feature_layer, args.vision_feature_select_strategy,
                               args.legacy_patch_drop)
    widths = vision.hidden_size
    llm_width = lm.get_input_embeddings().embedding_dim   # OpenELM's config says model_dim, not hidden_size
    connector = build_connector(args.connector, widths[0], llm_width, vision_dim2=widths[-1],
                                num_queries=args.num_queries, num_layers=args.num_resampler_layers,
                                newline=bool(args.max_tiles))
    return lm, vision, connector.to(dtype)


def set_tiling(model, max_tiles):
    """A stage's max_tiles on a loaded model: 0 keeps the model's; N turns tiling on (a fresh image_newline, as the
    connector's init) or changes the tile count (the newline stays: it does not depend on it)."""
    if not max_tiles or max_tiles == model.max_tiles:
        return
    if not model.max_tiles:
        emb = model.language_model.get_input_embeddings()   # its width from the module: ZeRO-3 may have partitioned
        like = emb.weight                                    # the weight to an empty placeholder at load
        model.connector.image_newline = nn.Parameter((torch.randn(emb.embedding_dim) * 0.02).to(like.device, like.dtype))
    model.max_tiles = model.args.max_tiles = max_tiles


def build_model(args, llm_kwargs=None):
    """A new model from pretrained parts: LLM and tower(s) from Hub ids or dirs, a freshly initialised connector.
    llm_kwargs go to the LLM's from_pretrained (e.g. quantization_config for QLoRA)."""
    lm, vision, connector = _build(args, llm_kwargs=llm_kwargs)
    tokenizer = load_tokenizer(args.tokenizer or args.llm, args.trust_remote_code)
    processor = load_image_processor(args.vision_tower)   # MoF: CLIP's
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    model = TinyLlava(lm, vision, connector, args, image_size(processor))
    check_finite(model, f"{args.llm} + {args.vision_tower}")
    return model, tokenizer, processor


def save_pretrained(model, tokenizer, processor, out_dir, state_dict=None, template=None):
    """Self-contained: config.json (our args + the LLM's and towers' configs), model.safetensors, tokenizer and
    image-processor files, each written to a temp name and renamed; plus what transformers needs to run it (hf_files:
    `template` is the chat template it was trained with). trust_remote_code is false: our loaders run no code from
    it. `state_dict`: weights gathered elsewhere (ZeRO-3)."""
    os.makedirs(out_dir, exist_ok=True)
    config = {"model_type": "tinyllava_nano", "architectures": ["TinyLlavaNanoForConditionalGeneration"],
              "auto_map": auto_map("TinyLlavaNano"), **tiling_off_unsaid(asdict(model.args)),
              "trust_remote_code": False,
              "text_config": {k: v for k, v in model.language_model.config.to_dict().items() if k != "auto_map"},
              "vision_configs": [t.config.to_dict() for t in model.vision_tower.towers],
              "num_image_tokens": model.num_image_tokens}
    weights = os.path.join(out_dir, "model.safetensors")
    if state_dict is None:   # save_model drops the duplicate name of tied weights
        write_file(weights, lambda tmp: save_safetensors(model, tmp, metadata={"format": "pt"}))
    else:
        seen, unique = set(), {}
        for k, v in state_dict.items():                          # tied weights: keep the first name
            if v.data_ptr() not in seen or v.numel() == 0:
                seen.add(v.data_ptr())
                unique[k] = v.detach().cpu().contiguous()
        write_file(weights, unique)
    write_file(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2, default=str))
    objs, files = hf_files(tokenizer, template, model.num_image_tokens, model.args.image_aspect_ratio,
                           model.args.max_tiles)
    save_files(out_dir, objs[0], processor, *objs[1:], files=files)


def tiling_off_unsaid(args):
    """ModelArgs as saved: max_tiles only when tiling is on, so an untiled model's config.json is what it was."""
    return {k: v for k, v in args.items() if k != "max_tiles" or v}


# -------------------- Loading ---------------------------------------------------------------------------------------

def load_pretrained(path, llm_kwargs=None, trust_remote_code=False, transformers_ok=False, **overrides):
    """Every layout this project reads, from a folder or a Hub id (resolve: nothing but that snapshot is fetched):
    ours (save_pretrained); TinyLLaVA Factory's release, pretrain and LoRA layouts (layouts.read_tinyllava: its
    settings as ours, model.template the chat template it implies); with transformers_ok, a transformers
    image-text-to-text folder (a Llava) as transformers' own model, tokenizer and processor (evaluate.py runs it so;
    `dtype` the one override). No code runs unless the caller passes trust_remote_code=True (the user's
    --trust-remote-code; never the checkpoint's own config), a folder's .py files are never imported, non-finite
    weights are refused. llm_kwargs go to the LLM's from_pretrained (quantization_config: QLoRA on a stage's output)."""
    path = resolve(path)
    cfg_path = os.path.join(path, "config.json")
    config = read_json(cfg_path) if os.path.isfile(cfg_path) else None
    if layouts.is_tinyllava_factory(path):
        config, weights, tokenizer, processor = layouts.read_tinyllava(path, trust_remote_code)
    elif config is None:
        raise FileNotFoundError(f"{cfg_path} not found: not a model folder of ours, nor one of TinyLLaVA Factory's")
    elif transformers_ok and layouts.is_transformers(config):
        return layouts.load_transformers(path, DTYPES[overrides.get("dtype", "float32")], trust_remote_code)
    elif config.get("model_type") != "tinyllava_nano":
        raise ValueError(f"{cfg_path}: model_type is {config.get('model_type')!r}, expected 'tinyllava_nano' (ours) or "
                         "'tinyllava' (TinyLLaVA Factory's)" + " (a transformers model: evaluate.py runs it)" *
                         layouts.is_transformers(config))
    else:
        weights = load_file(os.path.join(path, "model.safetensors"))
        tokenizer = load_tokenizer(path)   # ours carry no code (save_files drops it): never run, whatever the flag
        processor = load_image_processor(path)
    return assemble(config, weights, tokenizer, processor, path, llm_kwargs, trust_remote_code, **overrides)


def assemble(config, weights, tokenizer, processor, source, llm_kwargs=None, trust_remote_code=False, **overrides):
    """The model described by a config.json dict of ours, filled with `weights` (our key names; popped). Its LLM
    path (`llm`) is read only for an LLM outside transformers, and only with trust_remote_code."""
    args = ModelArgs(**{f.name: config[f.name] for f in fields(ModelArgs) if f.name in config})
    for k, v in dict(overrides, trust_remote_code=trust_remote_code).items():
        setattr(args, k, v)
    lm_weights = {k[len("language_model."):]: weights.pop(k) for k in list(weights) if k.startswith("language_model.")}
    saved = {k: v for k, v in config["text_config"].items() if k != "auto_map"}   # a saved auto_map never counts
    kind = saved.get("model_type")
    if kind in CONFIG_MAPPING and CONFIG_MAPPING[kind] in MODEL_FOR_CAUSAL_LM_MAPPING:   # transformers' own LLM
        text_config = AutoConfig.for_model(**saved)
    elif not trust_remote_code:
        raise ValueError(f"{source}: its LLM {kind!r} is not a causal LM of transformers and runs code from "
                         f"{args.llm!r}: pass --trust-remote-code (trust_remote_code=True) if you trust it")
    else:   # e.g. OpenELM: its config class lives in the Hub repo's code, as does the model
        text_config = AutoConfig.from_pretrained(args.llm, trust_remote_code=True)
        text_config.update(saved)
    lm, vision, connector = _build(args, text_config=text_config, vision_configs=config["vision_configs"],
                                   llm_kwargs=llm_kwargs, lm_weights=lm_weights)
    model = TinyLlava(lm, vision, connector, args, image_size(processor))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise ValueError(f"the weights in {source} do not fit the model its config describes: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    check_finite(model, source)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.get("template"):   # the one an original checkpoint implies (layouts.infer_template)
        model.template = config["template"]
    return model, tokenizer, processor

"""
Checkpoints in layouts other than ours, read for model.load_pretrained (which assembles and checks them; nothing here
builds a model of ours): TinyLLaVA Factory's (the original's) into our config and weights, and a transformers
image-text-to-text folder (a Llava: convert.py to-llava's, or any) as transformers' own model, as evaluate.py runs it.
convert.py writes the original's release layout and Llava from ours (its exports).

    is_tinyllava_factory(path) -> config, weights, tokenizer, processor = read_tinyllava(path, trust_remote_code)
    is_transformers(config)    -> model, tokenizer, processor = load_transformers(path, dtype, trust_remote_code)

The original's layouts (reference §7.1; offline, no remote code), from a folder or a Hub id (folders.resolve): the
release (config.json model_type "tinyllava", safetensors, sharded or not, or .bin), the pretrain stage
(language_model/, vision_tower/, connector/, pytorch_model.bin read with weights_only=True) and LoRA output (PEFT
adapters, merged on load). They load to compute what the original does: `patch` always drops the first token
(legacy_patch_drop: SigLIP 729 -> 728). Template (config["template"], model.template once loaded): the config's
conv_version, else "pretrain" for the pretrain layout, else the vicuna-style one with the tokenizer's EOS. Image
processor: the directory's, else the Hub cache's, else the tower's stock one rebuilt from its config. The files a
checkpoint lists (index shards) stay inside it; the base LLM / tower its config names (the original records what it
trained from) is read where it is, an absolute path or a Hub id (the local cache only), not by a relative path that
climbs out with '..'. Its code runs only with --trust-remote-code, a folder's .py files never.
"""
import os
import re

from transformers import CONFIG_MAPPING

from data import TEMPLATES, get_template
from folders import (auto_load, check_finite, load_image_processor, load_tokenizer, merge_lora, read_json,
                     read_state_dict)

SUBDIRS = ("language_model", "vision_tower", "connector")
PREFIX = {"language_model": "language_model.", "vision_tower": "vision_tower._vision_tower.",
          "connector": "connector._connector."}
ORIGINAL_CONNECTORS = ("identity", "linear", "mof_mlp", "resampler")   # + mlp{N}x_gelu; same key names as ours
PREFERRED_TEMPLATE = {"phi": "phi", "stablelm": "phi", "llama": "llama", "gemma": "gemma", "openelm": "llama",
                      "qwen2": "qwen2_base"}   # text model_type -> name, among the templates whose EOS fits


# -------------------- Reading the original's files ------------------------------------------------------------------

def is_pretrain_layout(path):
    """The original's pretrain-stage layout: language_model/ and connector/ sub-folders, no config of ours."""
    return all(os.path.isdir(os.path.join(path, d)) for d in ("language_model", "connector"))


def is_tinyllava_factory(path):
    """A directory in one of the original's layouts (release, pretrain sub-directories, LoRA)."""
    cfg = os.path.join(path, "config.json")
    return (os.path.isfile(cfg) and read_json(cfg).get("model_type") == "tinyllava") or is_pretrain_layout(path)


def read_files(path):
    """(the original's config dict, its weights under the original's key names, layout name)."""
    cfg = read_json(os.path.join(path, "config.json")) if os.path.isfile(os.path.join(path, "config.json")) else {}
    if is_pretrain_layout(path):
        layout, weights = "pretrain", {}
        for sub in [s for s in SUBDIRS if os.path.isdir(os.path.join(path, s))]:
            d = os.path.join(path, sub)
            for k, v in read_state_dict(d).items():
                if sub == "connector":                    # '_connector.0.weight' (common) or '0.weight' (lora save)
                    k = k.split("_connector.", 1)[-1]
                weights[PREFIX[sub] + k] = v
            if sub != "connector" and os.path.isfile(os.path.join(d, "config.json")):
                cfg.setdefault("text_config" if sub == "language_model" else "vision_config",
                               read_json(os.path.join(d, "config.json")))
    else:
        layout, weights = "release", read_state_dict(path)
    weights = {k.replace(".base_layer", ""): v for k, v in weights.items()}
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        layout = "lora"
        merge_lora(weights, path)
    if any(k.startswith("model.mm_projector") for k in weights):
        raise ValueError(f"{path}: TinyLLaVABench-era keys (model.mm_projector.*); convert them with the original's "
                         "convert_legecy_weights_to_tinyllavafactory first")
    for key in ("connector_type", "text_config", "vision_config"):
        if not cfg.get(key):
            raise ValueError(f"{path}: the original's config.json has no {key!r}")
    return cfg, weights, layout


# -------------------- The original's config and names -> ours -------------------------------------------------------

def tower_prefixes(n_towers):
    root = PREFIX["vision_tower"]
    return [root] if n_towers == 1 else [root + "clip.", root + "dinov2."]


def our_tower_keys(weights, vision_configs, feature_layer):
    """Tower keys as ours: no `vision_model.` level (transformers 5 CLIP/SigLIP), and nothing our towers cut away
    (layers after the feature layer, post-norm, head) or do not keep (stale position_ids / inv_freq buffers)."""
    out, dropped = {}, 0
    for k, v in weights.items():
        for prefix, vc in zip(tower_prefixes(len(vision_configs)), vision_configs):
            if k.startswith(prefix):
                rest = k[len(prefix):].removeprefix("vision_model.")
                n = vc["num_hidden_layers"]
                keep = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
                m = re.match(r"encoder\.layers?\.(\d+)\.", rest)
                if (m and int(m[1]) >= keep) or rest.startswith(("post_layernorm.", "layernorm.", "head.")) \
                        or rest.endswith("position_ids"):
                    dropped, k = dropped + 1, None
                else:
                    k = prefix + rest
                break
        if k is not None and not k.endswith("rotary_emb.inv_freq"):
            out[k] = v
    return out, dropped


def default_processor(vision_config):
    """The image processor the original's tower ids ship with, rebuilt from the vision config (no Hub)."""
    from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor
    kind, s = vision_config["model_type"], vision_config.get("image_size", 224)
    if kind.startswith("siglip"):      # google/siglip-*: resize to s x s, bicubic, mean = std = 0.5
        return SiglipImageProcessor(size={"height": s, "width": s})
    if kind.startswith("clip"):        # openai/clip-vit-*: shortest edge s, centre crop s, CLIP mean/std
        return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},   # dinov2
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def find_local(files, own, named=None, config=None):
    """The first place holding one of `files`: the checkpoint's own folders (`own`), then `named`, a base model its
    `config` names (the original records what it trained from): a folder, absolute or relative to the working
    directory (refused if it climbs out with '..'), else a Hub id, looked up in the local cache only."""
    from huggingface_hub import snapshot_download
    for place, from_config in [(p, False) for p in own] + [(named, True)]:
        if from_config and place and os.path.isdir(place) and ".." in os.path.normpath(place).split(os.sep):
            raise ValueError(f"{config} names {place!r}, a relative path that climbs out with '..': refusing to read "
                             "it (name the base model by an absolute path or a Hub id)")
        if place and not os.path.isdir(place):
            try:
                place = snapshot_download(place, local_files_only=True)   # never downloads
            except (OSError, ValueError):   # not cached / not a repo id
                continue
        if place and any(os.path.isfile(os.path.join(place, f)) for f in files):
            return place
    return None


def infer_template(cfg, tokenizer, layout):
    for key in ("conv_version", "conv_mode", "template"):
        if cfg.get(key):
            get_template(cfg[key])   # raises on an unknown name
            return cfg[key]
    if layout == "pretrain":
        return "pretrain"
    fits = [n for n, t in TEMPLATES.items() if getattr(t, "eos", "") and t.eos == tokenizer.eos_token]
    if fits:
        preferred = PREFERRED_TEMPLATE.get(cfg["text_config"].get("model_type"))
        return preferred if preferred in fits else fits[0]
    raise ValueError(f"no chat template ends answers with {tokenizer.eos_token!r}: pass --template")


def read_tinyllava(path, trust_remote_code=False):
    """A TinyLLaVA Factory checkpoint as ours: (a config.json dict of ours, with "template", the chat template it
    implies; the weights under our key names; tokenizer; image processor), for model.assemble."""
    cfg, weights, layout = read_files(path)
    vision_configs = [cfg["vision_config"].get("vision_config", cfg["vision_config"])]   # a full CLIP config: its tower
    if cfg.get("vision_model_name_or_path2") or cfg["connector_type"] == "mof_mlp":
        if not cfg.get("vision_config2"):   # written by our to-tinyllava only
            raise ValueError(f"{path}: an original MoF checkpoint does not store its DINOv2 config")
        vision_configs.append(cfg["vision_config2"])
    connector = cfg["connector_type"]
    if connector not in ORIGINAL_CONNECTORS and not re.fullmatch(r"mlp\d+x_gelu", connector):
        raise ValueError(f"{path}: connector {connector!r} cannot be read (the original's qformer keys differ "
                         f"from ours); readable: {', '.join(ORIGINAL_CONNECTORS)}, mlp{{N}}x_gelu")
    text_type = cfg["text_config"].get("model_type")
    if text_type not in CONFIG_MAPPING and not trust_remote_code:
        raise ValueError(f"{path}: LLM {text_type!r} is not in transformers and runs code from the Hub: pass "
                         "--trust-remote-code (trust_remote_code=True) if you trust it")
    hub = lambda p: re.sub(r"^(clip|siglip|dinov2|mof):", "", p or "")   # the original's "kind:hub_id" syntax
    args = dict(llm=cfg.get("llm_model_name_or_path", ""), tokenizer=cfg.get("tokenizer_name_or_path") or "",
                vision_tower=hub(cfg.get("vision_model_name_or_path")),
                vision_tower2=hub(cfg.get("vision_model_name_or_path2")), connector=connector,
                vision_feature_layer=cfg.get("vision_feature_layer", -2),
                vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "patch"),
                legacy_patch_drop=True,   # the original's 'patch' always drops the first token
                image_aspect_ratio="pad" if cfg.get("image_aspect_ratio") == "pad" else "square",   # anyres: dead there
                num_queries=cfg.get("num_queries") or 128, num_resampler_layers=cfg.get("num_resampler_layers") or 3)
    weights, dropped = our_tower_keys(weights, vision_configs, args["vision_feature_layer"])

    config_file = os.path.join(path, "config.json")
    tok_dir = find_local(("tokenizer_config.json", "tokenizer.json"), [path], args["tokenizer"] or args["llm"],
                         config_file)
    if tok_dir is None:
        raise FileNotFoundError(f"{path} has no tokenizer, nor has the Hub cache {args['tokenizer'] or args['llm']!r}")
    tokenizer = load_tokenizer(tok_dir, None if tok_dir == path else trust_remote_code)   # the flag: a base LLM's
    proc_dir = find_local(("preprocessor_config.json",), [path, os.path.join(path, "vision_tower")],
                          args["vision_tower"], config_file)
    processor = load_image_processor(proc_dir) if proc_dir else default_processor(vision_configs[0])
    template = infer_template(cfg, tokenizer, layout)
    print(f"reading TinyLLaVA Factory {layout} layout from {path}: {connector}, template {template!r}; {dropped} "
          "unused tower tensors dropped")
    config = dict(args, model_type="tinyllava_nano", text_config=cfg["text_config"], vision_configs=vision_configs,
                  template=template)
    return config, weights, tokenizer, processor


# -------------------- A transformers image-text-to-text folder (Llava), as transformers runs it ----------------------

def is_transformers(config):
    """A config.json dict of one of transformers' own image-text-to-text models (llava, ...; ours is registered, not
    one of them)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_transformers(path, dtype, trust_remote_code=False):
    """(transformers' model, its processor's tokenizer, its processor), the image processor PIL's (the original's
    pixels), the model checked for non-finite weights. trust_remote_code is always given: transformers never asks on
    stdin, and an auto_map in the folder is one LoadError without the flag."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = auto_load(AutoModelForImageTextToText, path, "model", trust_remote_code, dtype=dtype)
    check_finite(model, path)
    processor = auto_load(AutoProcessor, path, "processor", trust_remote_code)
    processor.image_processor = load_image_processor(path, trust_remote_code)
    return model, processor.tokenizer, processor


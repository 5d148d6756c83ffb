"""
Checkpoints in and out: TinyLLaVA Factory's layouts <-> ours, and export to transformers' own Llava.

    python convert.py from-tinyllava SRC DST [--template phi]   # an original checkpoint -> our self-contained dir
    python convert.py to-tinyllava SRC DST [--max-length 3072]  # one of ours -> the original's Hub release layout
    python convert.py to-llava SRC DST [--no-verify]            # ours or an original -> LlavaForConditionalGeneration

SRC is read by model.load_pretrained, in any layout it reads (ours; the original's release, pretrain and LoRA
layouts, layouts.py: offline, its code run only with --trust-remote-code, a folder's .py files never, non-finite
weights refused), from a folder or a Hub id. Outputs go to a new or empty folder, or with --overwrite to one
convert.py wrote (its record: tinyllava_convert.json; only the files it lists are replaced), and hold no half-written
file and no code but ours (our modeling code and auto_map, loaded with trust_remote_code=True as the original's
releases); from-tinyllava also writes train_config.json (the template).

Export to LlavaForConditionalGeneration keeps the logits: the tower is cut after the feature layer (Llava reads the
last); Llava's "default" strategy drops the first token (CLS or legacy SigLIP drop), "full" keeps all. Not exportable
(llava_blockers says which applies):
    MoF (vision_tower2)                Llava has one vision tower
    connector other than mlp2x_gelu    Llava's projector is Linear -> GELU -> Linear per token, nothing else
    Phi LLMs (phi-2)                   their LM head has a bias; Llava's lm_head has none
    Gemma-2 soft-capping, OpenELM      Llava runs AutoModel + its own plain head: no soft-cap, no remote code
    template "auto"                    the tokenizer's own template cannot place Llava's image items
    image_aspect_ratio "pad"           the exported processor would not pad to a square first
    tiling (max_tiles > 0)             Llava has no global view + tiles layout and no image_newline
A tiled model (max_tiles > 0) has no TinyLLaVA Factory layout either: to-tinyllava and to-llava refuse it in one
line, before DST is touched, rather than write a model that answers differently. What Llava cannot express, our folder
runs under plain transformers (trust_remote_code=True). Training tokenized each side of the image apart (the
original's tokenizer_image_token): Llama-style tokenizers get a "▁" after the image, so the exported chat template
writes "<image> " where that reproduces the training ids (checked on a probe conversation).
"""
import argparse
import copy
import json
import os
import sys

from settings import TEMPLATES, Choice, Int, Model, Output, Parser


def cli():
    p = Parser(prog="convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("from-tinyllava", "to-tinyllava", "to-llava"):
        s = sub.add_parser(name)
        s.add_argument("src", type=Model()), s.add_argument("dst", type=Output())
        s.add_argument("--template", default=None, type=Choice(*TEMPLATES), help="chat template (default: the "
                       "model's own)")
        if name == "to-tinyllava":
            s.add_argument("--max-length", type=Int(1), default=None, help="tokenizer_model_max_length to record")
        if name == "to-llava":
            s.add_argument("--no-verify", action="store_true", help="skip the logits check against the export")
        s.add_argument("--trust-remote-code", action="store_true",
                       help="run the LLM's own code (OpenELM); off: no code from a checkpoint or the Hub runs")
        s.add_argument("--overwrite", action="store_true", help="replace an earlier output of convert.py in DST")
    return p


if __name__ == "__main__":
    cli().parse_args()   # --help, a mistyped command and a bad value end here, before torch loads (6 s)

import torch
from transformers import CONFIG_MAPPING, AddedToken
from transformers.utils import logging as hf_logging

from data import ChatTemplate, IMAGE_PLACEHOLDER, encode, get_template, render
from folders import (auto_map, check_output, claim_output, hf_files, model_template, record_output, resolve,
                     save_files, trained_settings, write_file)
from folders import chat_template as llava_chat_template   # no tokenizer: LlavaProcessor adds its own special tokens
from layouts import find_local, is_tinyllava_factory, tower_prefixes
import model as model_py   # model_py.load_pretrained: SRC, in any layout
from model import DTYPES, image_size, save_pretrained
from modeling_tinyllava_nano import TOWERS


# -------------------- Ours -> the original's release layout ---------------------------------------------------------

def save_tinyllava(model, tokenizer, processor, out_dir, template, max_length=2048):
    """Our model as the original's Hub release: config.json (TinyLlavaConfig fields), model.safetensors (its names),
    and, as its releases carry theirs, our modeling code and auto_map (folders.hf_files: transformers runs it with
    trust_remote_code=True). What our tower cut away (later layers, post-norm, head) comes from the tower's checkpoint
    when it is available offline, else is left out (the original then initialises it randomly: same output)."""
    refuse_tiled(model, "to-tinyllava")
    args, towers = model.args, model.vision_tower.towers
    if args.connector == "qformer" or args.connector.startswith("pixel_shuffle"):
        raise ValueError(f"connector {args.connector!r}: the original has no such weights "
                         "(its Q-Former's keys differ, it has no pixel shuffle)")
    weights, seen = {}, set()
    for k, v in model.state_dict().items():   # tied weights: keep the first name, as HF saves do
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            weights[k] = v.detach().cpu().contiguous()
    filled = 0
    for prefix, tower, src in zip(tower_prefixes(len(towers)), towers, [args.vision_tower, args.vision_tower2]):
        kind, src = tower.config.model_type, find_local(("config.json",), [src])
        full = TOWERS[kind][0].from_pretrained(src) if src else None
        if full is not None and full.config.hidden_size == tower.config.hidden_size:
            ours = tower.state_dict()
            for k, v in full.state_dict().items():
                if k not in ours:
                    weights[prefix + k] = v.to(DTYPES[args.dtype]).contiguous()
                    filled += 1
        if not kind.startswith("dinov2"):
            weights = {(prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) else k): v
                       for k, v in weights.items()}
    vconfigs = [t.config.to_dict() for t in towers]
    vconfigs[0]["model_name_or_path"] = args.vision_tower
    lm, strategy = model.language_model, args.vision_feature_select_strategy
    if strategy == "patch" and not model.vision_tower.has_cls[0] and not args.legacy_patch_drop:
        strategy = "cls_patch"   # the original's 'patch' would drop a SigLIP patch; its 'cls_patch' keeps all, as ours
    config = dict(
        architectures=["TinyLlavaForConditionalGeneration"], model_type="tinyllava",
        llm_model_name_or_path=args.llm, tokenizer_name_or_path=args.tokenizer or args.llm,
        vision_model_name_or_path=args.vision_tower, vision_model_name_or_path2=args.vision_tower2,
        connector_type=args.connector, text_config=lm.config.to_dict(),
        hidden_size=lm.get_input_embeddings().embedding_dim, vocab_size=lm.get_input_embeddings().num_embeddings,
        ignore_index=-100, image_token_index=-200, pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id,
        tokenizer_padding_side="right", tokenizer_model_max_length=max_length, tokenizer_use_fast=False,
        vision_config=vconfigs[0], vision_hidden_size=towers[0].config.hidden_size,
        vision_feature_layer=args.vision_feature_layer, vision_feature_select_strategy=strategy,
        image_aspect_ratio=args.image_aspect_ratio, resampler_hidden_size=768, num_queries=args.num_queries,
        num_resampler_layers=args.num_resampler_layers, use_cache=True, torch_dtype=args.dtype,
        conv_version=template,   # not a field of the original (its scripts pass --conv-mode); read back by us
        auto_map=auto_map("TinyLlava"))
    if len(towers) == 2:
        config["vision_config2"] = vconfigs[1]   # the original re-downloads it; ours reads it from here
    os.makedirs(out_dir, exist_ok=True)
    write_file(os.path.join(out_dir, "model.safetensors"), weights)
    write_file(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2, default=str))
    objs, files = hf_files(tokenizer, template, model.num_image_tokens, args.image_aspect_ratio)
    save_files(out_dir, objs[0], processor, *objs[1:], files=files)
    print(f"wrote the TinyLLaVA Factory release layout to {out_dir} ({len(weights)} tensors, {filled} tower tensors "
          "after the feature layer filled from the tower checkpoint)")


TILED_TARGETS = {"to-tinyllava": "the TinyLLaVA Factory release layout (the original has no tiling)",
                 "to-llava": "a LlavaForConditionalGeneration (Llava has no tiling)"}


def refuse_tiled(model, command):
    """A one-line ValueError for a tiled model (max_tiles > 0), which `command`'s output cannot hold: its images'
    tokens (a global view, the tiles of a grid, image_newline after each row) would be read as one view's."""
    if getattr(model, "max_tiles", 0):
        raise ValueError(f"{command}: a tiled model (max_tiles={model.max_tiles}) cannot become "
                         f"{TILED_TARGETS[command]}: no global view + tiles layout, no image_newline; the folder "
                         "itself runs under transformers (trust_remote_code=True)")


# -------------------- Ours -> transformers' LlavaForConditionalGeneration + LlavaProcessor --------------------------

def llava_blockers(model, template):
    """Why this model cannot become a LlavaForConditionalGeneration (empty: it can)."""
    args, lm = model.args, model.language_model
    head = lm.get_output_embeddings()
    checks = [
        (len(model.vision_tower.towers) != 1, "two vision towers (MoF): Llava has one"),
        (args.connector != "mlp2x_gelu",
         f"connector {args.connector!r}: Llava's projector is Linear -> GELU -> Linear only"),
        (head is None or getattr(head, "bias", None) is not None,
         f"{type(lm).__name__}'s LM head has a bias (phi) or is not a Linear; Llava's lm_head has neither"),
        (getattr(lm.config, "final_logit_softcapping", None) or lm.config.model_type not in CONFIG_MAPPING,
         f"LLM {lm.config.model_type!r}: soft-capped logits or remote code, which Llava cannot run"),
        (not isinstance(get_template(template), ChatTemplate),
         f"template {template!r}: only TinyLLaVA's own templates become a Llava chat template"),
        (args.image_aspect_ratio != "square",
         f"image_aspect_ratio {args.image_aspect_ratio!r}: the exported processor would not pad"),
        (getattr(model, "max_tiles", 0), "tiled (max_tiles > 0): Llava has no global view + tiles layout, no "
                                         "image_newline")]
    return [why for bad, why in checks if bad]


def export_llava(model, tokenizer, processor, out_dir, template, verify=True):
    """Write LlavaForConditionalGeneration weights + config + LlavaProcessor (image processor, tokenizer with an
    <image> token, chat template) to out_dir. Raises ValueError naming every reason when the model does not fit."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    refuse_tiled(model, "to-llava")
    why = llava_blockers(model, template)
    if why:
        raise ValueError("cannot export to LlavaForConditionalGeneration (the folder itself runs under transformers "
                         "with trust_remote_code=True):\n  " + "\n  ".join(why))
    lm, tower, t = model.language_model, model.vision_tower.towers[0], get_template(template)
    tok = copy.deepcopy(tokenizer)   # + "<image>" as a special token (a new id, or its own if the vocab has it)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")

    sd = {"model.language_model." + k: v for k, v in lm.get_decoder().state_dict().items()}
    tied = lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    if not tied:
        sd["lm_head.weight"] = lm.get_output_embeddings().weight
    text_config = lm.config.to_dict()
    rows = lm.get_input_embeddings().num_embeddings
    if image_id >= rows:   # no spare row for the new token: add zero rows (suppressed in generation below)
        grow = lambda w: torch.cat([w, w.new_zeros(image_id + 1 - rows, w.shape[1])])
        embed_key = next(k for k in sd if k.endswith("embed_tokens.weight"))
        sd[embed_key] = grow(sd[embed_key])
        if not tied:
            sd["lm_head.weight"] = grow(sd["lm_head.weight"])
        text_config["vocab_size"] = image_id + 1
    sd.update({"model.vision_tower." + k: v for k, v in tower.state_dict().items()})
    for name in ("post_layernorm", "layernorm"):   # cut from our tower, present in Llava's; unused by hidden_states
        if hasattr(tower, name):
            sd[f"model.vision_tower.{name}.weight"] = torch.ones(tower.config.hidden_size)
            sd[f"model.vision_tower.{name}.bias"] = torch.zeros(tower.config.hidden_size)
    for i, ours in ((1, "0"), (2, "2")):
        sd.update({f"model.multi_modal_projector.linear_{i}.{k}": v
                   for k, v in model.connector._connector[int(ours)].state_dict().items()})
    vision_config = tower.config.to_dict()
    layers = tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer
    vision_config["num_hidden_layers"] = len(layers)      # cut after the feature layer: Llava reads the last one
    for key in ("out_features", "out_indices", "stage_names"):   # DINOv2's backbone fields follow the layer count
        vision_config.pop(key, None)
    if "vision_use_head" in vision_config:
        vision_config["vision_use_head"] = False
    drop_first = model.vision_tower.has_cls[0] or model.args.legacy_patch_drop
    strategy = "default" if model.args.vision_feature_select_strategy == "patch" and drop_first else "full"
    os.makedirs(out_dir, exist_ok=True)
    gen = next(o for o in hf_files(tokenizer, template, model.num_image_tokens, model.args.image_aspect_ratio)[0]
               if type(o).__name__ == "GenerationConfig")   # the stage folder's decoding (greedy, 128, its EOS)
    if image_id >= rows:
        gen.suppress_tokens = [image_id]
    save_files(out_dir, gen, LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id,
        image_seq_length=model.num_image_tokens, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy=strategy, multimodal_projector_bias=True,
        architectures=["LlavaForConditionalGeneration"]))
    write_file(os.path.join(out_dir, "model.safetensors"), {k: v.detach().cpu().contiguous() for k, v in sd.items()})

    # the chat template: "<image>" alone, or "<image> " where that reproduces the ids training saw (see top)
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "It is."}]
    want = encode(conv, t, tokenizer, 2)["input_ids"].tolist()
    for image in (IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER + " "):
        text = render(conv, ChatTemplate(**{**t.__dict__, "image": t.image.replace(IMAGE_PLACEHOLDER, image)}))[0]
        if tok(text.replace(IMAGE_PLACEHOLDER, "<image><image>")).input_ids == [image_id if i < 0 else i for i in want]:
            break
    else:
        print("warning: LlavaProcessor's one-pass tokenization differs from training's around the image "
              "for this tokenizer; logits for the same ids are unaffected")
        image = IMAGE_PLACEHOLDER
    save_files(out_dir, LlavaProcessor(
        image_processor=processor, tokenizer=tok, patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy, chat_template=llava_chat_template(template, image=image),
        num_additional_image_tokens=int(model.vision_tower.has_cls[0])))
    if verify:   # the files as transformers reads them vs our model, on the same prompt and a random image
        p = next(lm.parameters())
        llava = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=p.dtype).to(p.device).eval()
        ids = encode(conv[:1], t, tokenizer, model.num_image_tokens, for_generation=True)["input_ids"][None]
        ids = ids.to(p.device)
        pixels = torch.randn(1, 3, *image_size(processor), generator=torch.Generator().manual_seed(0)).to(p.device)
        with torch.no_grad():
            ours = model(ids, images=pixels)["logits"].float()
            theirs = llava(input_ids=ids.masked_fill(ids < 0, image_id), pixel_values=pixels).logits.float()
        err = (ours - theirs[..., :ours.shape[-1]]).abs().max().item()
        if err > (1e-3 if p.dtype == torch.float32 else 3e-2) * max(1.0, ours.abs().max().item()):
            raise RuntimeError(f"exported Llava's logits differ from ours by {err:.3g}: please report this")
        print(f"verified: Llava logits match ours (max abs diff {err:.2g})")
    print(f"wrote LlavaForConditionalGeneration + LlavaProcessor to {out_dir} ({strategy} features, image token "
          f"{image_id}, {model.num_image_tokens} per image, chat template {template!r})")


def main(argv=None):
    p = cli()   # defined at the top, so that --help answers before the imports
    a = p.parse_args(argv)
    a.src = resolve(a.src)   # a Hub id: its snapshot in the cache
    src, dst = os.path.realpath(a.src), os.path.realpath(a.dst)
    if os.path.commonpath([src, dst]) in (src, dst):   # writing into the source would overwrite what it reads
        p.error(f"{a.dst} is {a.src}, is inside it or contains it: it would overwrite the source; write elsewhere")
    if a.command == "from-tinyllava" and not is_tinyllava_factory(a.src):
        p.error(f"{a.src} is not a TinyLLaVA Factory checkpoint")
    hf_logging.disable_progress_bar()   # a "Loading weights" bar per load: noise
    check_output(a.dst, "convert.py", a.overwrite)   # before the model loads; claimed once it has
    model, tokenizer, processor = model_py.load_pretrained(a.src, trust_remote_code=a.trust_remote_code)
    template = model_template(a.src, model, a.template)   # a ValueError: one line (below)
    if a.command in TILED_TARGETS:   # before DST's earlier output is replaced
        refuse_tiled(model, a.command)
    claim = claim_output(a.dst, "convert.py", a.overwrite, command=a.command, source=src)
    if a.command == "from-tinyllava":
        save_pretrained(model, tokenizer, processor, a.dst, template=template)   # + the template our scripts read:
        write_file(os.path.join(a.dst, "train_config.json"), json.dumps({"template": template, "converted_from": src}))
        print(f"wrote {a.dst} (template {template!r})")
    elif a.command == "to-tinyllava":
        max_length = a.max_length or (trained_settings(a.src) or {}).get("max_length")
        save_tinyllava(model, tokenizer, processor, a.dst, template, max_length or 2048)
    else:
        export_llava(model, tokenizer, processor, a.dst, template, verify=not a.no_verify)
    record_output(a.dst, claim)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # a folder that cannot be read, written or loaded; a model Llava cannot hold
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(2)

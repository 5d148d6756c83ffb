"""
Training recipes: what each component (LLM, vision tower, connector) does in a stage, and the paper's
multi-stage recipes.

Tune types, per component:
    frozen      no gradients
    full        every parameter trains
    partial:K   transformer layers K.. train (plus, for the LLM, its final norm and head); embeddings and
                earlier layers stay frozen. TinyLLaVA Factory's "partially-tune" for the tower, extended to the LLM.
    lora        PEFT LoRA on every nn.Linear of the component except output heads (lm_head etc.), base frozen
    qlora       lora on a base quantised at load time by bitsandbytes (nf4 4-bit by default; qlora_bits=8 for int8)

    from recipes import apply_recipe, quantization_kwargs
    model, tok, proc = build_model(args, llm_kwargs=quantization_kwargs(cfg))   # only qlora needs this
    apply_recipe(model, cfg)     # freezes / wraps in place and prints the component table
"""
import os
import re

import torch
import torch.nn as nn

TUNE_TYPES = ("frozen", "full", "partial:K", "lora", "qlora")
LORA_SKIP = ("lm_head", "output_layer", "head")   # as the original: never adapt an output head

# The paper's recipes (TinyLLaVA Factory scripts/train/*.sh): each stage overrides train.py's config.
# `data` names the config keys data_<name> / images_<name> that hold that stage's files.
PRETRAIN = dict(name="pretrain", data="pretrain", template="pretrain", tune_llm="frozen",
                tune_vision_tower="frozen", tune_connector="full", lr=1e-3, global_batch_size=256)
FINETUNE = dict(name="finetune", data="finetune", tune_llm="full", tune_vision_tower="frozen",
                tune_connector="full", lr=2e-5, global_batch_size=128)
RECIPES = {
    "base": [PRETRAIN, FINETUNE],
    # ShareGPT4V: a middle stage on 1.2M detailed captions with the LLM trained (pretrain template, bs 256)
    "share": [PRETRAIN,
              dict(PRETRAIN, name="share_pretrain", data="share", tune_llm="full", lr=2e-5),
              dict(FINETUNE, data="share_finetune")],
    "lora": [PRETRAIN, dict(FINETUNE, tune_llm="lora", lora_r=128, lora_alpha=256, lr=2e-4)],
    "qlora": [PRETRAIN, dict(FINETUNE, tune_llm="qlora", lora_r=128, lora_alpha=256, lr=2e-4)],
}


def stages(cfg):
    """The list of stage configs for cfg.recipe, or cfg.stages when a config defines its own."""
    if cfg.get("stages"):
        return [dict(s) for s in cfg["stages"]]
    if cfg["recipe"] not in RECIPES:
        raise ValueError(f"unknown recipe {cfg['recipe']!r}; valid: {sorted(RECIPES)} (or define stages=[...])")
    return [dict(s) for s in RECIPES[cfg["recipe"]]]


def components(model):
    return {"llm": model.language_model, "vision_tower": model.vision_tower, "connector": model.connector}


def parse_tune(tune, component):
    if tune in ("frozen", "full", "lora", "qlora"):
        kind, k = tune, None
    elif re.fullmatch(r"partial:\d+", str(tune)):
        kind, k = "partial", int(tune.split(":")[1])
    else:
        raise ValueError(f"tune type {tune!r} for {component}; valid: {TUNE_TYPES}")
    if kind == "partial" and component == "connector":
        raise ValueError("partial:K applies to the LLM and the vision tower, not the connector")
    if kind == "qlora" and component != "llm":
        raise ValueError(f"qlora is for the LLM only (got it for {component}); use lora")
    return kind, k


def quantization_kwargs(cfg):
    """from_pretrained kwargs that quantise the LLM at load time, for tune_llm=qlora (else {})."""
    if cfg["tune_llm"] != "qlora":
        return {}
    from transformers import BitsAndBytesConfig
    compute = torch.bfloat16 if cfg.get("bf16") else torch.float32
    if cfg.get("qlora_bits", 4) == 8:
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    return {"quantization_config": q}


def lora_targets(module):
    """Names of every Linear (bitsandbytes' quantised Linears subclass it) except output heads."""
    return sorted({name for name, m in module.named_modules()
                   if isinstance(m, nn.Linear) and not any(s in name for s in LORA_SKIP)})


def wrap_lora(module, cfg, task_type=None, quantized=False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if quantized:   # fp32 norms, input grads for checkpointing: PEFT's recipe for k-bit bases
        module = prepare_model_for_kbit_training(module, use_gradient_checkpointing=cfg.get("gradient_checkpointing", False))
    config = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                        target_modules=cfg.get("lora_target_modules") or lora_targets(module), task_type=task_type)
    return get_peft_model(module, config)


def layer_index(name):
    """Transformer-block index in a parameter name (`layers.3.`, `layer.3.`, `h.3.`), or None."""
    m = re.search(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def set_partial(module, k, train_tail):
    """Blocks k.. train; outside the blocks only the tail (final norm, untied head) trains, and only if asked."""
    for name, p in module.named_parameters():
        i = layer_index(name)
        p.requires_grad_(i >= k if i is not None else train_tail and "embed" not in name)


def apply_recipe(model, cfg, verbose=True):
    """Freeze / unfreeze / LoRA-wrap each component in place from cfg['tune_llm'|'tune_vision_tower'|
    'tune_connector'] and print the table. Returns the table rows."""
    tunes = {"llm": cfg["tune_llm"], "vision_tower": cfg["tune_vision_tower"], "connector": cfg["tune_connector"]}
    for comp, tune in tunes.items():
        kind, k = parse_tune(tune, comp)
        module = components(model)[comp]
        if kind in ("lora", "qlora"):
            if comp == "llm":
                model.language_model = wrap_lora(module, cfg, "CAUSAL_LM", quantized=kind == "qlora")
            elif comp == "vision_tower":
                vt = module._vision_tower
                if isinstance(vt, nn.ModuleDict):
                    for key in list(vt.keys()):
                        vt[key] = wrap_lora(vt[key], cfg)
                else:
                    module._vision_tower = wrap_lora(vt, cfg)
            else:
                module._connector = wrap_lora(module._connector, cfg)
        elif kind == "partial":
            set_partial(module, k, train_tail=comp == "llm")
        else:
            module.requires_grad_(kind == "full")
    rows = []
    for comp, module in components(model).items():
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions: numel() is 0)
        total = sum(numel(p) for p in module.parameters())
        trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
        rows.append((comp, tunes[comp], trainable, total))
    if verbose:
        print(f"{'component':<14}{'tune':<12}{'trainable':>15}{'total':>15}")
        for comp, tune, trainable, total in rows:
            print(f"{comp:<14}{tune:<12}{trainable:>15,}{total:>15,}")
    return rows


def merge_adapters(model, stage_dir, cfg, init):
    """For the final save of a stage: every LoRA component gets a standard PEFT adapter folder
    (adapter_<component>/) and is merged into its base (QLoRA: onto the full-precision base of the previous
    stage, `init`; merging into a 4-bit base is lossy). Returns (model to save, its state dict), (model, None)
    when nothing is LoRA (the caller's state dict stands), or (None, None) when a QLoRA stage has no base."""
    from peft import PeftModel
    wrapped = {"llm": model.language_model, "connector": model.connector._connector}
    vt = model.vision_tower._vision_tower
    wrapped.update({f"vision_tower_{k}": v for k, v in vt.items()} if isinstance(vt, nn.ModuleDict)
                   else {"vision_tower": vt})
    if not any(isinstance(m, PeftModel) for m in wrapped.values()):
        return model, None
    for name, m in wrapped.items():
        if isinstance(m, PeftModel):
            m.save_pretrained(os.path.join(stage_dir, f"adapter_{name}"))
    if cfg["tune_llm"] == "qlora":
        from model import load_pretrained
        if not init:
            print("qlora without a previous stage: adapters saved, no merged model written")
            return None, None
        base = load_pretrained(init)[0]
        base.language_model = PeftModel.from_pretrained(base.language_model,
                                                        os.path.join(stage_dir, "adapter_llm")).merge_and_unload()
        base.connector.load_state_dict(model.connector.state_dict())
        base.vision_tower.load_state_dict(model.vision_tower.state_dict())
        model = base
    else:
        unwrap = lambda m: m.merge_and_unload() if isinstance(m, PeftModel) else m  # noqa: E731
        model.language_model = unwrap(model.language_model)
        model.connector._connector = unwrap(model.connector._connector)
        if isinstance(vt, nn.ModuleDict):
            for k in list(vt.keys()):
                vt[k] = unwrap(vt[k])
        else:
            model.vision_tower._vision_tower = unwrap(vt)
    # a copy (tied weights stay one tensor): under ZeRO-2 the parameters are views into DeepSpeed's flat buffers,
    # which safetensors refuses to write
    copies = {}
    return model, {k: copies.setdefault(v.data_ptr(), v.detach().clone()) for k, v in model.state_dict().items()}

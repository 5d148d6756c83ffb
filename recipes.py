"""
The run's configuration: train.py's DEFAULTS (one flat, commented block), how a config file and --key=value
override them (load_config), the paper's multi-stage recipes (stage_configs), the checks made before anything is
built (check_settings), and what each component (LLM, vision tower, connector) does in a stage.

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
import difflib
import math
import os
import re
import traceback
import warnings

from errors import ConfigError   # (recipes.ConfigError: a mistake in the command or config, one line, exit status 2)
from settings import TRAIN, Bool, Choice, tower_layers

DEFAULTS = dict(
    # --- model (see model.ModelArgs)
    llm="",                           # Hub id or dir of any causal LM
    tokenizer="",                     # "" = the llm's
    vision_tower="",                  # Hub id or dir: CLIP | SigLIP | DINOv2
    vision_tower2="",                 # DINOv2 for MoF (vision_tower is then CLIP)
    connector="mlp2x_gelu",           # identity | linear | mlp{N}x_gelu | qformer | resampler | mof_mlp | pixel_shuffle{S}_mlp{N}x_gelu
    vision_feature_layer=-2,
    vision_feature_select_strategy="patch",  # patch | cls_patch
    legacy_patch_drop=False,          # True reproduces the original's SigLIP first-patch drop (729 -> 728)
    num_queries=128,                  # qformer / resampler
    num_resampler_layers=3,
    trust_remote_code=False,          # OpenELM only: runs code from the Hub (never taken from a checkpoint)
    attn_implementation="",           # "" (sdpa) | eager | flash_attention_2 | flash_attention_3 | flex_attention
    dtype="float32",                  # weights: float32 | bfloat16 | float16 (bf16 autocast is separate, below)
    init_from="",                     # a saved model dir to start the first stage from
    # --- data
    template="phi",                   # phi | llama | gemma | qwen2_base | qwen2_instruct | auto (pretrain stages: pretrain)
    image_aspect_ratio="square",      # square (processor default, as the original's scripts) | pad
    max_tiles=0,                      # N > 0: tiling, each image a global view + a grid of <= N tower-sized tiles
                                      # chosen from its shape (docs/tiling.md); 0 in a later stage keeps the model's
    max_length=2048,                  # tokens incl. image tokens (the original: 2048; 3072 for share/lora/3.1B)
    data_pretrain="", images_pretrain="",      # LLaVA-format json/jsonl and its image folder, per recipe stage
    data_finetune="", images_finetune="",
    data_share="", images_share="",
    data_share_finetune="", images_share_finetune="",
    data_val="", images_val="",       # optional validation set (finetune-style template)
    group_by_length=True,             # batches of similar length, image and text-only samples apart
    bad_samples="error",              # error: stop at the first bad record | skip: leave it out, count and report it
    check_data_at_start=True,         # before the first stage trains, every stage's data as check_data.py checks it
                                      # (bad records stop the run; skip: reported only). Every image is decoded, on the
                                      # main process: the demo's 7,784 records 2.6 s; the base recipe's 558k + 665k
                                      # ~50 min (estimated: 1-3.5 ms a record here). False once check_data.py passed
    allow_outside_images=False,       # True: image paths may be absolute or leave the image folder ("../x.png")
    max_images=16,                    # images per sample (an "image" list) over this: a bad sample (too-many-images)
    feature_cache="",                 # a folder: a frozen tower's outputs computed once, reused (model.FeatureCache)
    num_workers=2,
    threads=0,                        # CPU threads for torch; 0 = measured once per machine and LLM width (cached):
                                      # 1 or all cores, whichever runs its matmuls faster (tiny models: often 1)
    # --- recipe (recipes.py)
    recipe="base",                    # base | share | lora | qlora
    stages=[],                        # or your own: [dict(name=..., data=..., tune_llm=..., lr=...), ...]
    tune_llm="frozen",                # frozen | full | partial:K | lora | qlora
    tune_vision_tower="frozen",       # frozen | full | partial:K | lora
    tune_connector="full",            # frozen | full | lora
    lora_r=128, lora_alpha=256, lora_dropout=0.05,
    lora_target_modules=[],           # [] = every Linear of the component except output heads
    qlora_bits=4,                     # 4 (nf4, double quant) | 8
    # --- optimisation
    lr=2e-5,
    lr_llm=0.0, lr_vision_tower=0.0, lr_connector=0.0,   # 0 = lr
    weight_decay=0.0,                 # never on biases and norms
    warmup_ratio=0.03,
    grad_clip=1.0,
    global_batch_size=128,            # = micro_batch_size x processes x accumulation steps
    micro_batch_size=4,
    epochs=1,
    max_steps=0,                      # > 0: stop after this many optimizer steps (per stage)
    bf16=True,                        # bf16 autocast (CPU and GPU)
    fp16=False,                       # fp16 autocast, GPU only
    gradient_checkpointing="auto",    # of the LLM's layers; auto: on if a measured step would not fit in memory
    compile=False,                    # torch.compile the LLM
    max_nonfinite_steps=3,            # a non-finite loss or gradient norm skips the step; this many in a row stop
    peak_flops=0.0,                   # FLOP/s of one process (a GPU) for the MFU, whose denominator is processes x
                                      # this; 0 = measured once (1 s), cached in $XDG_CACHE_HOME/tinyllava-nano/
                                      # machine.json: a process's share of its machine's peak (flops.process_peak)
    seed=42,
    # --- output
    out_dir="out/run",                # new or empty, or this run's own (its record: tinyllava_run.json)
    log_every=1,
    val_every=0,                      # steps; 0 = never
    val_batches=20,
    save_every=0,                     # checkpoint every N steps (0: only the final save)
    keep_checkpoints=0,               # 0: only the newest while the stage trains, none once it is finished;
                                      # N: the newest N, kept in the finished stage folder too
    tracker="",                       # "" | tensorboard | wandb | mlflow | ... (comma-separated; its package must be
                                      # installed: checked at start-up): <stage>/loss, lr, grad_norm, samples_per_s,
                                      # tokens_per_s, mfu_percent, epoch, elapsed_s, samples, tokens, flops, val_loss
                                      # over one step count for the run; the same in each stage's metrics.jsonl
    resume=False,                     # continue each stage from its latest checkpoint
    resume_allow="",                  # comma-separated settings whose change --resume accepts (e.g. "lr,max_steps");
                                      # "rng": resume without a saved RNG state; "data": on an edited data file
                                      # (both not exact)
    overwrite=False,                  # delete this run's stage folders in out_dir and start over (never a file
                                      # a run did not write: out_dir with such files is refused)
)

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
        raise ConfigError(f"unknown recipe {cfg['recipe']!r}; valid: {sorted(RECIPES)} (or define stages=[...])")
    return [dict(s) for s in RECIPES[cfg["recipe"]]]


# ----------------------------------------------------------------------------- config
RULES = {**TRAIN, "recipe": Choice(*RECIPES)}   # what each key accepts (settings.py): type, range, names, shape


def coerce(key, value, name=None, disk=False):
    """A command-line string (or config-file value) checked by the rule of its key (RULES) and returned in its type:
    else a ConfigError naming it (`name`; default --key). Paths are looked at later, with the run (check_settings)."""
    return RULES[key].check(name or f"--{key}", value, disk)


# Hugging Face Trainer's and TinyLLaVA Factory's names for our keys: an unknown key names ours
ALIASES = dict(learning_rate="lr", per_device_train_batch_size="micro_batch_size", num_train_epochs="epochs",
               gradient_accumulation_steps="global_batch_size (= micro_batch_size x processes x accumulation)",
               output_dir="out_dir", warmup_steps="warmup_ratio", max_grad_norm="grad_clip",
               logging_steps="log_every", save_steps="save_every", eval_steps="val_every",
               save_total_limit="keep_checkpoints", model_max_length="max_length", report_to="tracker",
               resume_from_checkpoint="resume", dataloader_num_workers="num_workers", model_name_or_path="llm",
               data_path="data_finetune", image_folder="images_finetune", mm_vision_select_layer="vision_feature_layer",
               mm_vision_select_feature="vision_feature_select_strategy", connector_type="connector",
               mm_projector_type="connector", conv_version="template", tune_type_llm="tune_llm",
               tune_type_vision_tower="tune_vision_tower", tune_type_connector="tune_connector",
               training_recipe="recipe", per_device_eval_batch_size="micro_batch_size")


def unknown(key):
    close = ([ALIASES[key]] if key in ALIASES else []) + difflib.get_close_matches(key, DEFAULTS, n=3)
    return ConfigError(f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


HOW = "a config is a Python file that assigns keys of DEFAULTS, as configs/*.py do: lr = 2e-5"


def read_config(path):
    """The names a --config file assigns. It runs as Python (only pass files you trust); YAML and the like are one
    line saying so, and so is whatever the file's code raises (with its line)."""
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml", ".json", ".toml", ".ini", ".cfg") or not path:
        raise ConfigError(f"--config {path!r}: {HOW}" + " (YAML's lr: 2e-5)" * bool(path))
    scope = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)   # a config is Python the user chose to run
    except OSError as e:
        raise ConfigError(f"--config {path!r}: {e.strerror or e}") from None
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: {e.msg}; {HOW}") from None
    except Exception as e:   # noqa: BLE001 -- whatever the file's code raises: YAML's `llm: org/name` is a NameError
        line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path][-1:] or ["?"]
        raise ConfigError(f"{path}, line {line[0]}: {type(e).__name__}: {e}; {HOW}") from None
    bare = [k for k in scope.get("__annotations__", {}) if k not in scope]   # `lr: 2e-5` annotates, assigns nothing
    if bare:
        raise ConfigError(f"{path}: {', '.join(bare)} annotated, not assigned; {HOW}")
    return {k: v for k, v in scope.items() if not k.startswith("_") and type(v).__name__ != "module"}


def load_config(argv):
    """DEFAULTS <- the --config file <- --key=value (--key-name is --key_name), each value checked by its rule
    (RULES) as it enters: every bad value and unknown key in one error, a line each. Stage overrides
    (--finetune.lr=...) go to cfg['stage_overrides']."""
    cfg, overrides, args, problems = dict(DEFAULTS), {}, [], []
    for a in argv:   # --key value is --key=value: join them first
        if args and args[-1].startswith("--") and "=" not in args[-1] and not a.startswith("--"):
            args[-1] += "=" + a
        else:
            args.append(a)
    paths = [a.partition("=")[2] for a in args if a.split("=")[0] == "--config"]
    args = [a for a in args if a.split("=")[0] != "--config"]

    def take(name, value, into, say):   # into[name] = the checked value, or a problem
        try:
            into[name] = coerce(name, value, say)
        except ConfigError as e:
            problems.append(str(e))
    for path in paths:
        for k, v in read_config(path).items():
            if k not in DEFAULTS:
                problems.append(f"{path}: {unknown(k)}")
            else:
                take(k, v, cfg, f"{path}: {k}")
    for arg in args:
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r}; use --key=value")
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")   # --max-steps is --max_steps
        stage, dot, name = key.rpartition(".")
        if name not in DEFAULTS:
            problems.append(str(unknown(name)))
        elif not eq and not isinstance(RULES[name], Bool):   # --feature_cache alone is not a folder named "true"
            problems.append(f"--{key}: needs a value (--{key}=...; expected {RULES[name].what})")
        else:
            value = value if eq else "true"   # a bare flag: --resume
            take(name, value, overrides.setdefault(stage, {}) if dot else cfg, f"--{key}")
    if problems:
        raise ConfigError("\n".join(problems))
    cfg["stage_overrides"] = overrides
    return cfg


def stage_configs(cfg):
    """The config of each stage: the run's, then what the stage sets (each key and value checked), then its
    --<stage>.<key> overrides; every problem in one error."""
    out, problems = [], []
    plan = stages(cfg)
    names = [s["name"] for s in plan]
    for stage in plan:
        scfg = dict(cfg)
        for k, v in stage.items():
            if k not in DEFAULTS and k not in ("name", "data"):
                problems.append(f"stage {stage['name']!r}: {unknown(k)}")
            elif k in DEFAULTS:
                try:
                    scfg[k] = coerce(k, v, f"stage {stage['name']}: {k}")
                except ConfigError as e:
                    problems.append(str(e))
        scfg.update(cfg["stage_overrides"].get(stage["name"], {}))
        scfg["stage"], scfg["data"] = stage["name"], stage.get("data", stage["name"])
        if f"data_{scfg['data']}" not in DEFAULTS:
            problems.append(f"stage {stage['name']}: data={scfg['data']!r} names no data_{scfg['data']} key; valid: "
                            + ", ".join(k[5:] for k in DEFAULTS if k.startswith("data_")))
        out.append(scfg)
    for name in cfg["stage_overrides"]:
        if name not in names:
            problems.append(f"--{name}.*: no stage named {name!r}; stages: {names}")
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def check_settings(stage_cfgs, world=1):
    """What the values mean together, for `world` processes, before torch loads (each value was checked as it
    entered: load_config, stage_configs): the model and the files each stage reads exist, the folders the run writes
    can be written, something trains, the batch arithmetic, the run options. Every problem in one error, a line each."""
    problems, c = {}, stage_cfgs[0]   # problem -> the stages that have it
    if not c["init_from"] and not (c["llm"] and c["vision_tower"]):
        problems["no model: give --config, or --llm and --vision_tower (or --init_from)"] = []
    for key in ("llm", "tokenizer", "vision_tower", "vision_tower2", "init_from", "feature_cache", "out_dir"):
        try:
            coerce(key, c[key], disk=True)
        except ConfigError as e:
            problems[str(e)] = []
    for tower in [c[k] for k in ("vision_tower", "vision_tower2") if c[k] and not c["init_from"]]:
        n, layer = tower_layers(tower), c["vision_feature_layer"]
        if n is not None and not 0 <= (layer if layer >= 0 else n + 1 + layer) <= n:
            problems[f"--vision_feature_layer: expected a layer of the {n}-layer tower {tower} (from {-n - 1} to {n}),"
                     f" got {layer}"] = []
    for c in stage_cfgs:
        bad = ["every component is frozen (tune_llm, tune_vision_tower, tune_connector): nothing would train"] * all(
            c[f"tune_{k}"] == "frozen" for k in ("llm", "vision_tower", "connector"))
        gbs, mb = c["global_batch_size"], c["micro_batch_size"]
        if mb >= 1 and gbs % (mb * world):
            bad.append(f"global_batch_size {gbs} is not micro_batch_size {mb} x {world} processes x a whole number "
                       "of accumulation steps")
        data, images = f"data_{c['data']}", f"images_{c['data']}"
        if not c.get(data):
            bad.append(f"{data} is not set (the data file of this stage)")
        elif not os.path.isfile(c[data]):
            bad.append(f"{data}: {c[data]!r} is not a file")
        if c.get(images) and not os.path.isdir(c[images]):
            bad.append(f"{images}: {c[images]!r} is not a folder")
        if c["val_every"] and c["data_val"] and not os.path.isfile(c["data_val"]):
            bad.append(f"data_val: {c['data_val']!r} is not a file")
        for p in bad:
            problems.setdefault(p, []).append(c["stage"])
    c = stage_cfgs[0]
    if c["resume"] and c["overwrite"]:
        problems["--resume and --overwrite contradict each other"] = []
    for name in resume_allowed(c) - set(DEFAULTS) - {"rng", "processes", "data"}:
        problems[f"--resume_allow: {unknown(name)}"] = []
    if c["tracker"]:   # a missing package would be a debug message of Accelerate's, and an untracked run
        from run_log import tracker_problems
        problems.update(dict.fromkeys(tracker_problems(c["tracker"]), []))
    msgs = [p if len(st) in (0, len(stage_cfgs)) else f"stage {'/'.join(st)}: {p}" for p, st in problems.items()]
    if msgs:
        raise ConfigError("\n".join(msgs))


def resume_allowed(cfg):
    return {k.strip() for k in cfg["resume_allow"].split(",") if k.strip()}


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
    import torch
    # bitsandbytes, imported by transformers to quantise at load, logs "Failed to load CPU gemm_4bit_forward from
    # kernels-community" on CPUs with AVX512-BF16 where the optional `kernels` package (a Hub download) is missing,
    # and uses its own CPU kernel instead: that message alone is dropped (run_log._Drop)
    from run_log import drop_message
    drop_message("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")
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
    import torch.nn as nn
    return sorted({name for name, m in module.named_modules()
                   if isinstance(m, nn.Linear) and not any(s in name for s in LORA_SKIP)})


def wrap_lora(module, cfg, task_type=None, quantized=False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if quantized:   # fp32 norms, input grads for checkpointing: PEFT's recipe for k-bit bases
        module = prepare_model_for_kbit_training(module, use_gradient_checkpointing=cfg["gradient_checkpointing"] is True)
    config = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                        target_modules=cfg.get("lora_target_modules") or lora_targets(module), task_type=task_type)
    with warnings.catch_warnings():   # PEFT reads transformers' deprecated alias (a FutureWarning in transformers 5)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
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
    import torch.nn as nn
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
    if not any(cfg[f"tune_{c}"] in ("lora", "qlora") for c in ("llm", "vision_tower", "connector")):
        return model, None   # (without importing peft: 0.4 GB and seconds that a run without LoRA does not need)
    import torch.nn as nn
    from peft import PeftModel
    wrapped = {"llm": model.language_model, "connector": model.connector._connector}
    vt = model.vision_tower._vision_tower
    wrapped.update({f"vision_tower_{k}": v for k, v in vt.items()} if isinstance(vt, nn.ModuleDict)
                   else {"vision_tower": vt})
    if not any(isinstance(m, PeftModel) for m in wrapped.values()):
        return model, None
    from folders import save_adapter   # one PEFT adapter of the whole model, its base named, the connector in it
    adapter = os.path.join(stage_dir, "adapter_llm")
    save_adapter(model, adapter, os.path.abspath(init) if init else None)
    if cfg["tune_llm"] == "qlora":
        from folders import merge_lora
        from model import load_pretrained, set_tiling
        if not init:
            print("qlora without a previous stage: adapters saved, no merged model written")
            return None, None
        base = load_pretrained(init, trust_remote_code=cfg.get("trust_remote_code", False))[0]   # the user's flag
        set_tiling(base, cfg.get("max_tiles", 0))   # as the stage's model: this stage may have turned tiling on
        weights = base.state_dict()
        merge_lora(weights, adapter)   # onto the full-precision base; the fully trained parts replace theirs
        base.load_state_dict(weights)
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


# ----------------------------------------------------------------------------- optimizer: per-component groups, the schedule
def param_groups(model, cfg):
    """AdamW groups per component (own lr) x (decay, no decay): biases and norms (ndim < 2) never decay."""
    groups = []
    for comp, module in (("llm", model.language_model), ("vision_tower", model.vision_tower),
                         ("connector", model.connector)):
        lr = cfg[f"lr_{comp}"] or cfg["lr"]
        params = [p for p in module.parameters() if p.requires_grad]
        for decay in (True, False):
            ps = [p for p in params if (p.ndim >= 2) == decay]
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": cfg["weight_decay"] if decay else 0.0,
                               "name": f"{comp}{'' if decay else '_no_decay'}"})
    if not groups:
        raise ValueError("nothing to train: every component is frozen")
    return groups


def cosine_with_warmup(step, warmup, total):
    """HF's get_cosine_schedule_with_warmup, the original's scheduler."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

"""
Saved folders: files written whole or not at all, Hub ids resolved to a local snapshot, what a folder we load may
not do (run its code, bring NaNs), and what makes a folder of ours runnable by transformers and PEFT alone (model.py's
save_pretrained and convert.py write these; nothing here imports model.py, layouts.py or convert.py):

    write_file(path, text | {name: tensor} | fn)    save_files(out_dir, *objs_with_save_pretrained, files={name: text})
    resolve("org/name") -> a snapshot folder (cache first, offline-friendly)
    chat_template("phi", tokenizer) -> Jinja    hf_files(tokenizer, template, num_image_tokens, aspect) -> (objs, files)
    save_adapter(model, out_dir, base)          # a LoRA stage as one PEFT adapter of the whole model (see there)
    auto_load(AutoTokenizer, path, "tokenizer", trust_remote_code)   # never asks "run the custom code?"
    load_tokenizer(path, trust_remote_code)     load_image_processor(path)   # (auto_load: the original's pad, PIL)
    trained_settings(path) -> train_config.json, checked    model_template(path, model, template)   # its template
    check_finite(model, source)                 # LoadError (errors.py) naming the first NaN / inf tensor
    claim = claim_output(out_dir, "convert.py", overwrite, command=...); record_output(out_dir, claim)   # outputs
    read_state_dict(folder) -> {name: tensor}   merge_lora(weights, adapter_folder)   # layouts.py, QLoRA's merge

A folder transformers can run: config.json's auto_map names modeling_tinyllava_nano.py (and modeling_connectors.py,
connectors.py under another name), the tokenizer's chat template is the training template (its ids are data.encode's:
tested for every template), generation_config.json holds the template's EOS and evaluate.py's decoding (greedy, 128
new tokens), processor_config.json the image tokens per image.
"""
import copy
import json
import math
import os
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig

from data import IMAGE_PLACEHOLDER, ChatTemplate, encode, get_template
from errors import LoadError
from modeling_tinyllava_nano import encode_text

EVAL_MAX_NEW_TOKENS = 128   # evaluate.py's default (the official scripts')
HERE = os.path.dirname(os.path.abspath(__file__))
CODE = {"modeling_tinyllava_nano.py": "modeling_tinyllava_nano.py", "modeling_connectors.py": "connectors.py"}


def auto_map(prefix):
    """config.json's auto_map: "TinyLlavaNano" (ours) or "TinyLlava" (the original's layout) classes in our code."""
    model = f"modeling_tinyllava_nano.{prefix}ForConditionalGeneration"
    return {"AutoConfig": f"modeling_tinyllava_nano.{prefix}Config", "AutoModelForCausalLM": model,
            "AutoModelForImageTextToText": model}


# -------------------- Files: written whole or not at all -----------------------------------------------------------

def write_file(path, content):
    """`content` (text; a dict of tensors: safetensors; a function: content(path)) to a temp name, renamed to `path`:
    a crash or a full disk leaves no half-written file there, and a failure is one error naming the file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, dict):
            save_file(content, tmp, metadata={"format": "pt"})
        else:
            with open(tmp, "w") as f:
                f.write(content)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"could not write {path}: {e}") from None


def read_json(path):
    with open(path) as f:
        return json.load(f)


# -------------------- Reading weights: safetensors or .bin (weights_only), sharded or not; PEFT LoRA adapters -----

def inside(root, name, source):
    """root/name, refused unless it stays inside root: what a checkpoint's files name never leads the reader
    elsewhere. Lexical (normpath), not realpath: a Hub-cache snapshot's files are symlinks into ../../blobs."""
    path, root = os.path.abspath(os.path.join(root, name)), os.path.abspath(root)
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"{source} names {name!r}, which is outside {root}: refusing to read it")
    return path


def read_state_dict(d, names=("model.safetensors", "pytorch_model.bin")):
    """The tensors of a HF-style save in directory d: one file or the shards its index names. .bin files are read
    with weights_only=True: tensors only, no pickled code runs."""
    load = lambda f: load_file(f) if f.endswith(".safetensors") else torch.load(f, "cpu", weights_only=True)
    for name in names:
        index = os.path.join(d, name + ".index.json")
        if os.path.isfile(index):
            shards = sorted(set(read_json(index)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load(inside(d, shard, index)).items()}
        if os.path.isfile(os.path.join(d, name)):
            return load(os.path.join(d, name))
    raise FileNotFoundError(f"no weights in {d} (looked for {', '.join(names)} and their sharded indexes)")


def merge_lora(weights, path):
    """Merge the PEFT LoRA adapters saved in `path` into `weights` (original key names), in place, in fp32."""
    acfg = read_json(os.path.join(path, "adapter_config.json"))
    if acfg.get("peft_type", "LORA") != "LORA" or acfg.get("use_dora"):
        raise ValueError(f"{path}: only plain LoRA adapters merge, not {acfg.get('peft_type')} / DoRA")
    pairs = {}
    for k, v in read_state_dict(path, ("adapter_model.safetensors", "adapter_model.bin")).items():
        k = k.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.\w+)?\.weight", k)   # older PEFT kept the adapter name
        if m:
            pairs.setdefault(m[1], {})[m[2]] = v
        elif "lora_" in k:
            raise ValueError(f"{path}: cannot merge {k} (only LoRA on Linear layers merges)")
        else:                                                       # a bias / module trained next to the adapters
            weights[k.replace(".base_layer", "")] = v
    for name, ab in pairs.items():
        if name + ".weight" not in weights:
            raise ValueError(f"{path}: adapter for {name}, which is not in the base weights")
        alpha = next((a for pattern, a in (acfg.get("alpha_pattern") or {}).items()   # PEFT: on the name's tail
                      if re.fullmatch(rf"(.*\.)?({pattern})", name)), acfg["lora_alpha"])
        r = ab["A"].shape[0]
        delta = ab["B"].float() @ ab["A"].float() * (alpha / (math.sqrt(r) if acfg.get("use_rslora") else r))
        weights[name + ".weight"] = weights[name + ".weight"].float() + (delta.T if acfg.get("fan_in_fan_out")
                                                                         else delta)
    print(f"merged {len(pairs)} LoRA adapters from {path}")


def save_files(out_dir, *objs, files=None):
    """objs.save_pretrained, then `files` ({name: text}), into out_dir by way of a temp folder: no half-written file
    gets a final name. Code the objects bring is dropped (the .py files copied for remote-code classes, `auto_map`
    in their configs): the only code in our folders is our own, named in `files`."""
    tmp = tempfile.mkdtemp(prefix=".save-", dir=out_dir)
    try:
        for obj in objs:
            obj.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            f = os.path.join(tmp, name)
            if name.endswith(".py"):
                os.remove(f)
            elif name.endswith("config.json") and "auto_map" in (cfg := read_json(f)):
                write_file(f, json.dumps({k: v for k, v in cfg.items() if k != "auto_map"}, indent=2))
        for name, text in (files or {}).items():
            write_file(os.path.join(tmp, name), text)
        for name in sorted(os.listdir(tmp)):
            if os.path.isfile(os.path.join(tmp, name)):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    except Exception as e:   # a full disk: OSError, or a bare Exception from the tokenizers library
        raise OSError(f"could not write {out_dir}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OUTPUT_RECORD = "tinyllava_convert.json"


def check_output(out_dir, tool, overwrite=False):
    """`out_dir` may take `tool`'s output: it is new or empty, or, with `overwrite`, `tool` wrote it (its record,
    OUTPUT_RECORD, names the tool). Any other folder is refused (ValueError, one line). Returns (its names, record)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file, not a folder: refusing to write there")
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    rec = read_json(os.path.join(out_dir, OUTPUT_RECORD)) if OUTPUT_RECORD in names else {}
    if names and rec.get("tool") != tool:
        raise ValueError(f"{out_dir} is not empty and {tool} did not write it ({', '.join(sorted(names)[:3])}"
                         f"{', ...' * (len(names) > 3)}): refusing to write into it, even with --overwrite; choose a "
                         "new or empty folder")
    if names and not overwrite:
        raise ValueError(f"{out_dir} holds an earlier output of {tool} ({rec.get('command')} of {rec.get('source')}): "
                         "pass --overwrite to replace it, or choose a new or empty folder")
    return names, rec


def claim_output(out_dir, tool, overwrite=False, **what):
    """check_output, then the files of `tool`'s earlier output are deleted: those its record lists, or, for a run that
    did not finish, those that were not there when it started; never a file `tool` did not write. The record is
    written at once (a crash leaves the folder marked as `tool`'s) with `what` (command, source); returns it."""
    names, rec = check_output(out_dir, tool, overwrite)
    for name in rec["files"] if "files" in rec else names - set(rec.get("kept", [])) - {OUTPUT_RECORD}:
        if os.path.basename(name) == name and os.path.isfile(os.path.join(out_dir, name)):   # a name in the folder
            os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    claim = dict(tool=tool, **what, kept=sorted(set(os.listdir(out_dir)) - {OUTPUT_RECORD}))   # not ours: stays
    write_file(os.path.join(out_dir, OUTPUT_RECORD), json.dumps(claim, indent=2))
    return claim


def record_output(out_dir, claim):
    """The claim's record, completed: every file written (all but those kept)."""
    files = sorted(n for n in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, n))
                   and n not in claim["kept"] and n != OUTPUT_RECORD)
    write_file(os.path.join(out_dir, OUTPUT_RECORD), json.dumps(dict(claim, files=files), indent=2))


def resolve(path):
    """A folder as it is; a Hub id ("org/name") as its snapshot folder: the local cache's, else (unless HF_HUB_OFFLINE)
    downloaded, all but code files (nothing we read runs code)."""
    if os.path.isdir(path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return path
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:   # noqa: BLE001 - not cached (or no such id): try the Hub
        try:
            return snapshot_download(path, ignore_patterns=["*.py"])
        except Exception as e:   # noqa: BLE001 - offline, unknown id, no network: one line saying so
            raise FileNotFoundError(f"{path} is not a folder, nor a Hub model in the local cache or reachable: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


# -------------------- Loading a folder's parts: never its code, never its NaNs; its stage record ------------------

def auto_load(cls, path, what, trust_remote_code=None, **kwargs):
    """cls.from_pretrained(path) with trust_remote_code always given, so transformers never asks "Do you wish to run
    the custom code?" (which a "y" on stdin would answer): the user's flag (True / False), or None: no flag allows it
    here (given as False). Code it refuses to run (an auto_map in the folder's files) is one LoadError."""
    try:
        return cls.from_pretrained(path, trust_remote_code=bool(trust_remote_code), **kwargs)
    except ValueError as e:
        if "trust_remote_code" not in str(e) or trust_remote_code:
            raise
        raise LoadError(f"{path}: its {what} asks to run code of its own (auto_map), which is not run"
                        + " without --trust-remote-code" * (trust_remote_code is False)) from None


# transformers 5 preprocesses with torchvision when it is installed, else PIL: PIL gives the original's pixels exactly
PIXELS = "pil"


def load_image_processor(path, trust_remote_code=None):
    return auto_load(AutoImageProcessor, path, "image processor", trust_remote_code, backend=PIXELS)


def load_tokenizer(path, trust_remote_code=None):   # None: no flag runs its code (auto_load)
    tok = auto_load(AutoTokenizer, path, "tokenizer", trust_remote_code)
    # The original sets pad := unk for phi / tinyllama / gemma / openelm and keeps Qwen2's own pad; padding is
    # masked by the attention mask we build from lengths, so only generation configs ever see this id.
    if tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def trained_settings(path):
    """<path>/train_config.json (train.py's stage record, or convert.py from-tinyllava's), checked: an object naming
    its chat template; None without one. Anything else is one LoadError naming the file."""
    f = os.path.join(path, "train_config.json")
    if not os.path.isfile(f):
        return None
    try:
        cfg = read_json(f)
    except (OSError, ValueError) as e:
        raise LoadError(f"{f}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("template"), str):
        raise LoadError(f"{f}: not a stage record (a JSON object naming its chat template, \"template\"): an "
                        "unfinished or damaged stage folder; pass --template to use its weights anyway")
    return cfg


def model_template(path, model, template=None):
    """`template`, else <path>/train_config.json's, else the one an original checkpoint implies (model.template)."""
    if template is None:
        template = (trained_settings(path) or {}).get("template")
    template = template or getattr(model, "template", None)
    if template is None:
        raise ValueError(f"{path} has no train_config.json: pass --template (the chat template it was trained with)")
    get_template(template)   # raises on an unknown name
    return template


def check_finite(model, source):
    """Refuse a model with a NaN or infinite weight (a diverged or damaged checkpoint: it would answer "!!!!" and be
    scored, exported or trained on), naming the first such tensor; every loader runs this on what it loaded."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or t.is_meta:   # quantised (uint8) or not loaded on this rank: nothing to see
            continue
        chunks = t.detach().reshape(-1).split(2 ** 24)   # no bool copy of a whole embedding at once
        if not all(bool(torch.isfinite(c).all()) for c in chunks):
            what = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise LoadError(f"{source}: weight {name} holds {what} values: refusing to load a non-finite model "
                            "(a diverged or damaged checkpoint)")


# -------------------- A folder transformers can run: chat template, generation config, processor, code ------------

PROBE = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
         {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "It is."}]


def messages(conversation):
    """LLaVA turns -> chat messages (the image stays "<image>" in the text, as every chat template here reads it)."""
    return [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in conversation]


def chat_template(template, tokenizer=None, image=IMAGE_PLACEHOLDER):
    """A Jinja chat template rendering what data.render does for `template` (messages in HF's format, content a string
    or a list of {"type": "image"} / {"type": "text"} items; "auto": the tokenizer's own). With `tokenizer`, it opens
    with the BOS text that makes the ids training's (data.encode's) through tokenizer.apply_chat_template(tokenize=
    True) and the processor, checked on a probe conversation; Llama's "▁" after BOS needs "<s> " there. `image`
    replaces the placeholder (convert.py's Llava export may add a space)."""
    t = get_template(template)
    if not isinstance(t, ChatTemplate):
        return getattr(tokenizer, "chat_template", None)
    s = json.dumps   # a Jinja string literal
    user_pre, user_post = t.user.split("{q}")
    ans_pre, ans_post = t.answer.split("{a}")
    body = (
        "{{- " + s(t.system) + " -}}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set ns = namespace(text='') -%}{%- for c in message['content'] -%}"   # images in place
        "{%- set ns.text = ns.text + (c['text'] if c['type'] == 'text' else '<image>\\n' if c['type'] == 'image' else '')"
        " -%}{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}{%- set n = text.count('<image>') -%}"
        "{%- set text = text.replace('<image>', '') if n == 1 else text -%}"
        + ("" if t.keep_question else "{%- set text = '<image>' * n if n > 1 else '' -%}") +
        "{%- if n == 1 -%}{%- set text = (" + s(t.image.replace(IMAGE_PLACEHOLDER, image))
        + " + text.strip()).strip() -%}"   # one image: moved to the front; several: in place (data.render)
        "{%- elif n > 1 -%}{%- set text = text.strip().replace('<image>', " + s(image) + ") -%}{%- endif -%}"
        "{{- " + s(user_pre) + " + text + " + s(user_post) + " + " + s(t.prompt) + " -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- " + s(ans_pre) + " + text + " + s(ans_post) + " + " + s(t.eos) + " -}}"
        "{%- endif -%}{%- endfor -%}")
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or tokenizer("").input_ids[:1] != [tokenizer.bos_token_id]:
        return body   # the tokenizer adds no BOS (phi, qwen2): nothing to open with
    probes = [PROBE, PROBE[:2]] + ([[{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "It is."}]]
                                   if t.keep_question else [])
    for opening in ("{{- bos_token -}}", "{{- bos_token + ' ' -}}"):
        ok = True
        for conv in probes:
            want = encode(conv, t, tokenizer, 1)["input_ids"].tolist()
            text = tokenizer.apply_chat_template(messages(conv), chat_template=opening + body, tokenize=False)
            ok &= encode_text(tokenizer, text, 1, add_special_tokens=not text.startswith(bos)) == want
            if IMAGE_PLACEHOLDER not in text:   # the tokenizer alone: text without images
                ok &= tokenizer(text, add_special_tokens=False).input_ids == want
        if ok:
            return opening + body
    print(f"warning: no chat template opening reproduces training's ids with this tokenizer ({template!r})")
    return "{{- bos_token -}}" + body


def hf_files(tokenizer, template, num_image_tokens, image_aspect_ratio, max_tiles=0):
    """What makes a folder loadable by transformers besides config.json: (objects to save_pretrained, {name: text}).
    With `template` (the one it was trained with) the tokenizer carries its chat template and generation_config.json
    its EOS and evaluate.py's decoding (greedy, 128 new tokens); processor_config.json the image tokens per image (per
    view, and max_tiles, when tiled); and our modeling code (connectors.py as modeling_connectors.py)."""
    tok, objs = copy.deepcopy(tokenizer), []
    if template:   # (unknown: the tokenizer keeps its own chat template, generation uses transformers' defaults)
        t = get_template(template)
        tok.chat_template = chat_template(t, tokenizer)
        eos = [tokenizer.convert_tokens_to_ids(t.eos)] if isinstance(t, ChatTemplate) and t.eos else []
        eos = list(dict.fromkeys(eos + [tokenizer.eos_token_id] * (tokenizer.eos_token_id is not None)))
        objs = [GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                 eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id)]
    files = {name: open(os.path.join(HERE, src)).read() for name, src in CODE.items()}
    files["processor_config.json"] = json.dumps({
        "processor_class": "TinyLlavaNanoProcessor", "num_image_tokens": num_image_tokens,
        "image_aspect_ratio": image_aspect_ratio, **({"max_tiles": max_tiles} if max_tiles else {}),
        "auto_map": {"AutoProcessor": "modeling_tinyllava_nano.TinyLlavaNanoProcessor"}}, indent=2)
    return [tok] + objs, files


# -------------------- A LoRA stage as a PEFT adapter -----------------------------------------------------------------

def save_adapter(model, out_dir, base):
    """A LoRA stage of ours (PEFT-wrapped parts of `model`) as ONE standard PEFT adapter of the whole model, which is
    what a saved folder is to transformers: every LoRA pair under the model's key names (base_model.model.
    language_model..., the original's LoRA layout too), the parts that trained in full (the connector; a tower)
    whole as modules_to_save, and base_model_name_or_path = `base`, the folder (or Hub id) the stage started from,
    whose weights the adapters were trained on. PEFT alone then rebuilds the merged model:

        AutoPeftModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)   # or without, after `import model`
    """
    from peft import PeftModel, get_peft_model_state_dict   # not at import: `import model` stays light
    tensors, targets, whole, config = {}, [], [], None
    for part in ("language_model", "vision_tower", "connector"):
        module = getattr(model, part)
        wrapped = [(n, m) for n, m in module.named_modules() if isinstance(m, PeftModel)]
        if not wrapped and any(p.requires_grad for p in module.parameters()):
            whole.append(part if part == "language_model" else f"{part}._{part}")   # PEFT matches name endings:
            # "connector" would also match "connector._connector", and PEFT then loads it twice
            tensors.update({f"base_model.model.{part}.{k}": v for k, v in module.state_dict().items()})
        for name, m in wrapped:
            prefix = f"{part}.{name}." if name else f"{part}."
            cfg = m.peft_config["default"]
            if config is not None and (cfg.r, cfg.lora_alpha) != (config.r, config.lora_alpha):
                raise ValueError("the LoRA parts of this model differ in r / lora_alpha: no one adapter holds them")
            config = config or cfg
            for k, v in get_peft_model_state_dict(m, save_embedding_layers=False).items():
                k = prefix + k.removeprefix("base_model.model.")
                tensors["base_model.model." + k] = v
                if ".lora_A." in k:
                    targets.append(k.split(".lora_A.")[0])
    if config is None:
        raise ValueError("no LoRA in this model: save_pretrained writes it")
    config = copy.deepcopy(config)
    config.base_model_name_or_path, config.task_type, config.inference_mode = base, "CAUSAL_LM", True
    config.target_modules, config.modules_to_save = sorted(targets), whole or None
    os.makedirs(out_dir, exist_ok=True)
    write_file(os.path.join(out_dir, "adapter_model.safetensors"),
               {k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    write_file(os.path.join(out_dir, "adapter_config.json"), json.dumps(config.to_dict(), indent=2, default=str))

"""Folders that transformers and PEFT run on their own. A stage folder loads through the Auto classes once `model`
is imported, and through trust_remote_code=True with the repository nowhere in sight (a subprocess in another
folder, the repository off sys.path, HF_HUB_OFFLINE=1), giving our logits: Phi's biased LM head, MoF (CLIP+DINOv2),
a pixel-shuffle connector, and convert.py to-tinyllava's original layout included. Its chat template gives training's
token ids for every template; a LoRA stage is a PEFT adapter that AutoPeftModelForCausalLM rebuilds into the merged
model; load_pretrained takes a Hub id from the cache; `import model` pulls in neither convert.py nor peft."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor, AutoTokenizer)

import convert
import folders
from data import TEMPLATES, encode, preprocess_image
from model import ModelArgs, build_model, load_pretrained, load_tokenizer, save_pretrained
from modeling_tinyllava_nano import TinyLlavaNanoConfig, TinyLlavaNanoForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = Image.new("RGB", (40, 24), (200, 40, 30))
CONV = [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "It is."}]
TEXT = [{"from": "human", "value": "Why is the sky blue?"},
        {"from": "gpt", "value": "Because air scatters blue light."}]
# template -> tokenizer family it belongs with (pretrain: a BOS-adding and a BOS-less tokenizer)
FAMILY = {"phi": "phi", "llama": "llama", "gemma": "gemma", "qwen2_base": "qwen2", "qwen2_instruct": "qwen2",
          "pretrain": "llama", "auto": "qwen2"}


def build(tiny_llms, tiny_towers, family="llama", tower="siglip", seed=0, **kw):
    args = ModelArgs(llm=tiny_llms[family], vision_tower=tiny_towers[tower], **kw)
    if kw.get("vision_tower2"):
        args.vision_tower2 = tiny_towers[kw["vision_tower2"]]
    model, tok, proc = build_model(args)
    torch.manual_seed(seed)
    with torch.no_grad():   # a connector that matters: the init's N(0, 0.02) hardly moves the logits
        for p in model.connector.parameters():
            p.normal_(0, 0.5)
    return model.eval(), tok, proc


def prompt_ids(model, tok, template):
    q = [{"from": "human", "value": "<image>\nWhat is shown?"}]
    return encode(q, template, tok, model.num_image_tokens, for_generation=True)["input_ids"][None]


def hf_messages(conversation, image=None):
    """LLaVA turns as chat messages; with `image`, the placeholder becomes a {"type": "image"} item."""
    out = []
    for m in conversation:
        text = m["value"]
        if image is not None and "<image>" in text:
            text = [{"type": "image", "image": image}, {"type": "text", "text": text.replace("<image>", "").strip()}]
        out.append({"role": "user" if m["from"] == "human" else "assistant", "content": text})
    return out


# ---------------------------------------------------------------------------------------------- registered Auto classes
def test_auto_classes_load_a_stage_folder(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = build(tiny_llms, tiny_towers, "llama", "clip")
    out = str(tmp_path / "stage")
    save_pretrained(model, tok, proc, out, template="llama")
    assert isinstance(AutoConfig.from_pretrained(out), TinyLlavaNanoConfig)
    ours = load_pretrained(out)[0].eval()
    processor = AutoProcessor.from_pretrained(out)
    processor.image_processor = AutoImageProcessor.from_pretrained(out, backend="pil")   # training's pixels
    msgs = hf_messages(CONV[:1], IMAGE)
    inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = prompt_ids(model, tok, "llama")
    assert inputs["input_ids"].tolist() == ids.tolist()
    assert torch.equal(inputs["pixel_values"][0], preprocess_image(IMAGE, proc))
    with torch.no_grad():
        want = ours(ids, images=inputs["pixel_values"])["logits"]
        for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
            hf = auto.from_pretrained(out).eval()
            assert type(hf) is TinyLlavaNanoForConditionalGeneration
            torch.testing.assert_close(hf(**inputs).logits, want, rtol=0, atol=1e-6)
    gen = hf.generation_config   # evaluate.py's decoding: greedy, 128 new tokens, stop at the template's EOS
    assert (gen.do_sample, gen.num_beams, gen.max_new_tokens) == (False, 1, 128)
    assert tok.convert_tokens_to_ids("</s>") in gen.eos_token_id
    new = ours.generate(ids, torch.ones_like(ids), images=inputs["pixel_values"], max_new_tokens=4, min_new_tokens=4)
    full = hf.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert full[0, ids.shape[1]:].tolist() == new[0].tolist()
    assert processor.batch_decode(full[:, ids.shape[1]:]) == [tok.decode(new[0])]


# ---------------------------------------------------------------------------------------------- remote code, no repo
SCRIPT = r"""
import json, os, sys
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor
from peft import AutoPeftModelForCausalLM
jobs = json.load(open(sys.argv[1]))
report = {"repo_on_path": [p for p in sys.path if p and os.path.abspath(p) == jobs["repo"]], "classes": {}}
messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 24), (9, 99, 199))},
                                         {"type": "text", "text": "What is shown?"}]}]
for name, job in jobs["folders"].items():
    x = load_file(job["inputs"])
    if job.get("adapter"):   # PEFT reads base_model_name_or_path and loads that folder's remote code
        model = AutoPeftModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True).eval()
        report["classes"][name] = type(model.base_model.model).__module__
    else:
        model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True).eval()
        report["classes"][name] = type(model).__module__
    with torch.no_grad():
        out = {"logits": model(input_ids=x["input_ids"], pixel_values=x["pixel_values"]).logits}
    if job.get("processor"):
        processor = AutoProcessor.from_pretrained(job["folder"], trust_remote_code=True)
        out["processor_ids"] = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True, return_tensors="pt")["input_ids"]
        out["generated"] = model.generate(input_ids=x["input_ids"], pixel_values=x["pixel_values"],
                                          max_new_tokens=3, min_new_tokens=3)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(jobs["out"], name + ".safetensors"))
report["modules"] = sorted(m for m in ("model", "convert", "folders", "connectors", "data") if m in sys.modules)
json.dump(report, open(os.path.join(jobs["out"], "report.json"), "w"))
"""

def run_without_repo(tmp_path, jobs):
    """Run SCRIPT on `jobs` in a fresh interpreter that cannot import the repository: returns its report and
    outputs."""
    work = tmp_path / "elsewhere"
    (work / "out").mkdir(parents=True)
    (work / "script.py").write_text(SCRIPT)
    (work / "jobs.json").write_text(json.dumps({"repo": ROOT, "out": str(work / "out"), "folders": jobs}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(work / "script.py"), str(work / "jobs.json")], cwd=str(work), env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((work / "out" / "report.json").read_text())
    return report, {name: load_file(str(work / "out" / f"{name}.safetensors")) for name in jobs}


def test_remote_code_runs_every_kind_without_the_repository(tiny_llms, tiny_towers, tmp_path):
    """What Llava cannot express (Phi's LM-head bias, MoF, other connectors), as our folders and as to-tinyllava's
    original layout, under plain transformers; and a LoRA stage through PEFT's AutoPeftModelForCausalLM."""
    from recipes import wrap_lora
    cases = {   # name -> (family, tower, ModelArgs extras, template)
        "phi_bias": ("phi", "siglip", {}, "phi"),
        "mof": ("llama", "clip", {"vision_tower2": "dinov2", "connector": "mof_mlp"}, "llama"),
        "shuffle": ("gemma", "siglip", {"connector": "pixel_shuffle2_mlp2x_gelu"}, "gemma"),
        "resampler": ("qwen2", "dinov2", {"connector": "resampler", "num_queries": 5, "num_resampler_layers": 1},
                      "qwen2_base")}
    jobs, want, sources = {}, {}, {}
    g = torch.Generator().manual_seed(0)
    for name, (family, tower, extra, template) in cases.items():
        model, tok, proc = build(tiny_llms, tiny_towers, family, tower, **extra)
        folder = str(tmp_path / name)
        save_pretrained(model, tok, proc, folder, template=template)
        ours = load_pretrained(folder)[0].eval()
        ids = prompt_ids(ours, tok, template)
        pixels = torch.randn(1, 3, 32, 32, generator=g)
        save_file({"input_ids": ids, "pixel_values": pixels}, str(tmp_path / f"{name}.in.safetensors"))
        with torch.no_grad():
            want[name] = (ours(ids, images=pixels)["logits"], ids,
                          ours.generate(ids, torch.ones_like(ids), images=pixels, max_new_tokens=3, min_new_tokens=3))
        jobs[name] = {"folder": folder, "inputs": str(tmp_path / f"{name}.in.safetensors"), "processor": True}
        sources[name] = (model, tok, proc, template)
    assert sources["phi_bias"][0].language_model.get_output_embeddings().bias is not None
    for name in ("phi_bias", "mof"):   # the original's release layout, with our code as its release carries its own
        model, tok, proc, template = sources[name]
        folder = str(tmp_path / f"{name}_original")
        convert.save_tinyllava(model, tok, proc, folder, template)
        assert json.loads(open(os.path.join(folder, "config.json")).read())["model_type"] == "tinyllava"
        jobs[f"{name}_original"] = dict(jobs[name], folder=folder, processor=False)
        want[f"{name}_original"] = want[name]
    # a LoRA stage started from the llama MoF folder: adapters on the LLM, the connector trained in full
    model = load_pretrained(jobs["mof"]["folder"])[0]
    model.requires_grad_(False)
    model.language_model = wrap_lora(model.language_model, dict(lora_r=4, lora_alpha=8, lora_dropout=0.0),
                                     "CAUSAL_LM")
    model.connector.requires_grad_(True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("connector."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    folders.save_adapter(model, str(tmp_path / "adapter"), jobs["mof"]["folder"])
    model.language_model = model.language_model.merge_and_unload()
    x = load_file(jobs["mof"]["inputs"])
    with torch.no_grad():
        want["adapter"] = (model.eval()(x["input_ids"], images=x["pixel_values"])["logits"],)
    jobs["adapter"] = dict(jobs["mof"], folder=str(tmp_path / "adapter"), adapter=True, processor=False)
    assert not torch.allclose(want["adapter"][0], want["mof"][0], atol=1e-3)   # the adapters matter

    report, outputs = run_without_repo(tmp_path, jobs)
    assert report["repo_on_path"] == [] and report["modules"] == []
    assert all(m.startswith("transformers_modules.") for m in report["classes"].values()), report["classes"]
    for name, got in outputs.items():
        torch.testing.assert_close(got["logits"], want[name][0], rtol=1e-5, atol=1e-5, msg=name)
        if jobs[name]["processor"]:
            assert got["processor_ids"].tolist() == want[name][1].tolist(), name
            assert got["generated"][0, want[name][1].shape[1]:].tolist() == want[name][2][0].tolist(), name


# ---------------------------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("template", list(TEMPLATES) + ["pretrain/phi"])
def test_chat_template_gives_training_ids(tiny_llms, tiny_towers, tmp_path, template):
    """apply_chat_template(tokenize=True) gives data.encode's ids: the processor's with images (training's
    num_image_tokens sentinels), the tokenizer's alone for text. "auto" (the tokenizer's own template) takes the image
    as "<image>" in a string, as training rendered it."""
    template, family = template.split("/") if "/" in template else (template, FAMILY[template])
    tok = load_tokenizer(tiny_llms[family])
    image_processor = AutoImageProcessor.from_pretrained(tiny_towers["siglip"], backend="pil")
    n = 3
    out = str(tmp_path / "folder")
    os.makedirs(out)
    objs, files = folders.hf_files(tok, template, n, "square")
    folders.save_files(out, objs[0], image_processor, *objs[1:], files=files)
    processor, tokenizer = AutoProcessor.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert processor.chat_template == tokenizer.chat_template is not None
    cases = [(CONV, False), (CONV[:3], True), (CONV[:1], True)] if template != "pretrain" else \
        [(CONV[:2], False), (CONV[:1], True)]
    for conv, generation in cases:
        want = encode(conv, template, tok, n, for_generation=generation)["input_ids"].tolist()
        if template == "auto":
            strings = [dict(m, value="<image>\n" + m["value"].replace("<image>", "").strip()) if "<image>" in m["value"]
                       else m for m in conv]
            got = processor.apply_chat_template(folders.messages(strings), add_generation_prompt=generation,
                                                tokenize=True, return_dict=True, processor_kwargs={"images": [IMAGE]})
        else:
            got = processor.apply_chat_template(hf_messages(conv, IMAGE), add_generation_prompt=generation,
                                                tokenize=True, return_dict=True)
        assert got["input_ids"] == want, (conv, generation)
        assert got["pixel_values"].shape == (1, 3, 32, 32)
    if template != "pretrain":
        for conv, generation in [(TEXT, False), (TEXT[:1], True)]:
            want = encode(conv, template, tok, n, for_generation=generation)["input_ids"].tolist()
            assert tokenizer.apply_chat_template(folders.messages(conv), add_generation_prompt=generation,
                                                 tokenize=True, return_dict=False) == want, (conv, generation)


# ---------------------------------------------------------------------------------------------- PEFT, Hub ids
def test_a_lora_stage_is_a_peft_adapter_of_its_base(tiny_llms, tiny_towers, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from recipes import wrap_lora
    model, tok, proc = build(tiny_llms, tiny_towers, "phi", "clip")
    base = str(tmp_path / "1_pretrain")
    save_pretrained(model, tok, proc, base, template="pretrain")
    model = load_pretrained(base)[0]   # as train.py starts a stage
    model.requires_grad_(False)
    model.language_model = wrap_lora(model.language_model, dict(lora_r=4, lora_alpha=8, lora_dropout=0.0),
                                     "CAUSAL_LM")
    model.connector.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("connector."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    adapter = str(tmp_path / "2_finetune" / "adapter")
    folders.save_adapter(model, adapter, base)
    cfg = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())
    assert cfg["base_model_name_or_path"] == base and cfg["modules_to_save"] == ["connector._connector"]
    assert all(t.startswith("language_model.") for t in cfg["target_modules"])
    model.language_model = model.language_model.merge_and_unload()
    model.eval()
    ids, pixels = prompt_ids(model, tok, "phi"), torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        merged = model(ids, images=pixels)["logits"]
        for peft_model in (AutoPeftModelForCausalLM.from_pretrained(adapter),
                           PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)):
            torch.testing.assert_close(peft_model.eval()(input_ids=ids, pixel_values=pixels).logits, merged,
                                       rtol=1e-5, atol=1e-5)
    weights = load_pretrained(base)[0].state_dict()   # the original's LoRA layout: our loader merges it as well
    folders.merge_lora(weights, adapter)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(weights[k].float(), v.float(), rtol=1e-5, atol=1e-5, msg=k)


def test_load_pretrained_takes_a_hub_id_from_the_cache(tiny_llms, tiny_towers, tmp_path, monkeypatch):
    import huggingface_hub.constants
    model, tok, proc = build(tiny_llms, tiny_towers, "qwen2", "siglip")
    cache = tmp_path / "hub"
    for repo, write in [("tiny/vlm", lambda d: save_pretrained(model, tok, proc, d, template="qwen2_base")),
                        ("tiny/original", lambda d: convert.save_tinyllava(model, tok, proc, d, "qwen2_base"))]:
        sha = "0123456789abcdef0123456789abcdef01234567"
        snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / sha
        write(str(snapshot))
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ids, pixels = prompt_ids(model, tok, "qwen2_base"), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(ids, images=pixels)["logits"]
        for repo in ("tiny/vlm", "tiny/original"):
            torch.testing.assert_close(load_pretrained(repo)[0].eval()(ids, images=pixels)["logits"], want, rtol=1e-5,
                                       atol=1e-5)
    with pytest.raises(FileNotFoundError, match="tiny/missing is not a folder, nor a Hub model"):
        load_pretrained("tiny/missing")   # HF_HUB_OFFLINE=1 (conftest): the cache or nothing


def test_model_py_is_light_and_the_modeling_file_self_contained():
    code = ("import model, sys; "
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'deepspeed', 'convert') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]

    def imports(name):   # every module a file imports, at any depth, inside try blocks too
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        return {(n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) and not n.level else
                "." if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])}
    for name in ("model.py", "layouts.py", "folders.py", "modeling_tinyllava_nano.py", "connectors.py"):
        assert "convert" not in imports(name), name   # convert.py imports model.py, never the reverse
    from transformers.dynamic_module_utils import get_imports   # what trust_remote_code requires installed
    for name in ("modeling_tinyllava_nano.py", "connectors.py"):
        needed = set(get_imports(os.path.join(ROOT, name))) - set(sys.stdlib_module_names)
        assert needed <= {"torch", "transformers", "safetensors"}, name
    assert imports("modeling_tinyllava_nano.py") <= {"torch", "transformers", "PIL", "connectors", "."}
    for name in ("model.py", "convert.py"):
        assert len(open(os.path.join(ROOT, name)).read().splitlines()) <= 500, name

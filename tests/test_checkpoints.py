"""layouts.py and convert.py: TinyLLaVA Factory checkpoints written here in each of the original's layouts (its key
names and config fields, tiny random weights), loaded by our loader (model.load_pretrained) and checked against a
hand-built forward pass of the original's math; our models written in its release layout; export to transformers'
LlavaForConditionalGeneration."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer,
                          CLIPVisionModel, LlavaForConditionalGeneration, SiglipVisionModel)

import convert
from conftest import write_dataset
from data import IMAGE_TOKEN_INDEX, TEMPLATES, ChatTemplate, encode, preprocess_image, render
from model import ModelArgs, build_model, load_pretrained, save_pretrained   # load: every layout (layouts.py)

TOWER_CLS = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
QUESTION = [{"from": "human", "value": "What is shown?\n<image>"}]   # the template moves the image to the front


def picture(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 24, 3), generator=g, dtype=torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------- the original, by hand
def original_parts(tiny_llms, tiny_towers, family, tower, dtype=torch.float32):
    """The parts of an original checkpoint: HF LLM, HF vision model, mlp2x_gelu tensors; values rounded to `dtype`
    (what its files hold) and kept in fp32."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_llms[family]).to(dtype).float().eval()
    vt = TOWER_CLS[tower].from_pretrained(tiny_towers[tower]).to(dtype).float().eval()
    g = torch.Generator().manual_seed(1)
    d, dv = lm.config.hidden_size, vt.config.hidden_size
    conn = {"0.weight": torch.randn(d, dv, generator=g) * 0.3, "0.bias": torch.randn(d, generator=g) * 0.1,
            "2.weight": torch.randn(d, d, generator=g) * 0.3, "2.bias": torch.randn(d, generator=g) * 0.1}
    return lm, vt, {k: v.to(dtype).float() for k, v in conn.items()}


def original_config(lm, vt, tokenizer, connector="mlp2x_gelu", strategy="patch"):
    """config.json as the original's TinyLlavaConfig writes it (reference §1.2, §7.2); Hub ids that do not exist."""
    vision_config = dict(vt.config.to_dict(), model_name_or_path="nobody/vision-tiny")
    return dict(
        architectures=["TinyLlavaForConditionalGeneration"], model_type="tinyllava",
        auto_map={"AutoConfig": "configuration.TinyLlavaConfig",
                  "AutoModelForCausalLM": "modeling_tinyllava_phi.TinyLlavaForConditionalGeneration"},
        llm_model_name_or_path="nobody/llm-tiny", tokenizer_name_or_path=None,
        vision_model_name_or_path="nobody/vision-tiny", vision_model_name_or_path2="", connector_type=connector,
        text_config=lm.config.to_dict(), hidden_size=lm.config.hidden_size, vocab_size=lm.config.vocab_size,
        ignore_index=-100, image_token_index=-200, pad_token=tokenizer.unk_token, pad_token_id=tokenizer.unk_token_id,
        tokenizer_padding_side="right", tokenizer_model_max_length=3072, tokenizer_use_fast=False,
        vision_config=vision_config, vision_hidden_size=vt.config.hidden_size, vision_feature_layer=-2,
        vision_feature_select_strategy=strategy, image_aspect_ratio="square", resampler_hidden_size=768,
        num_queries=128, num_resampler_layers=3, use_cache=True, torch_dtype="float16", tune_type_llm="full",
        tune_type_vision_tower="frozen", tune_type_connector="full", tune_vision_tower_from_layer=0)


def write_release(d, lm, vt, conn, config, tokenizer, dtype=torch.float16, shards=2):
    """The Hub release layout: config.json, safetensors shards + index, tokenizer files (no image processor)."""
    sd = {**{"language_model." + k: v for k, v in lm.state_dict().items()},
          **{"vision_tower._vision_tower.vision_model." + k: v for k, v in vt.state_dict().items()},
          **{"connector._connector." + k: v for k, v in conn.items()}}
    if lm.config.tie_word_embeddings:
        del sd["language_model.lm_head.weight"]
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {k: sd[k].to(dtype).clone().contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(d, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    if shards > 1:
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.save_pretrained(d)


def original_logits(lm, vt, conn, input_ids, pixels, layer=-2, drop_first=True):
    """The original's forward, one image: hidden_states[layer] (no post-norm), `patch` = drop the first token,
    Linear-GELU-Linear, the features spliced in place of the single -200 by concatenation (LLaVA's way)."""
    feats = vt(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    feats = feats[:, 1:] if drop_first else feats
    x = F.linear(F.gelu(F.linear(feats, conn["0.weight"], conn["0.bias"])), conn["2.weight"], conn["2.bias"])
    k = int((input_ids == IMAGE_TOKEN_INDEX).nonzero()[0])
    emb = lm.get_input_embeddings()
    embeds = torch.cat([emb(input_ids[:k]), x[0], emb(input_ids[k + 1:])])
    return lm(inputs_embeds=embeds[None]).logits


def compare(model, processor, tokenizer, template, lm, vt, conn, tower_dir, drop_first=True):
    """Our loaded model vs the original's math on one prompt; our image processor vs the tower's own."""
    image = picture()
    pixels = preprocess_image(image, processor)
    torch.testing.assert_close(pixels, preprocess_image(image, AutoImageProcessor.from_pretrained(tower_dir)))
    ours = encode(QUESTION, template, tokenizer, model.num_image_tokens, for_generation=True)["input_ids"]
    theirs = encode(QUESTION, template, tokenizer, 1, for_generation=True)["input_ids"]   # one -200, as the original
    with torch.no_grad():
        got = model(ours[None], images=pixels[None])["logits"]
        want = original_logits(lm, vt, conn, theirs, pixels[None], drop_first=drop_first)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return got


# ---------------------------------------------------------------------------------------------- reading the original
@pytest.mark.parametrize("family,tower,dtype,shards,template,tokens", [
    ("llama", "siglip", torch.float16, 2, "llama", 15),   # SigLIP: the original's patch drop, 16 -> 15
    ("phi", "clip", torch.float32, 1, "phi", 16),         # CLIP: the CLS token goes
    ("gemma", "siglip", torch.float16, 3, "gemma", 15),   # tied embeddings: no lm_head in the files
])
def test_release_layout_gives_the_originals_logits(tiny_llms, tiny_towers, tmp_path, family, tower, dtype, shards,
                                                   template, tokens):
    lm, vt, conn = original_parts(tiny_llms, tiny_towers, family, tower, dtype)
    tok = AutoTokenizer.from_pretrained(tiny_llms[family])
    write_release(str(tmp_path), lm, vt, conn, original_config(lm, vt, tok), tok, dtype, shards)
    model, tokenizer, processor = load_pretrained(str(tmp_path))   # HF_HUB_OFFLINE: nothing may be fetched
    assert model.template == template and model.num_image_tokens == tokens
    assert model.args.legacy_patch_drop and model.args.image_aspect_ratio == "square"
    assert len(model.vision_tower.towers[0].encoder.layers) == vt.config.num_hidden_layers - 1
    assert tokenizer.pad_token == tokenizer.unk_token or tokenizer.unk_token is None
    compare(model, processor, tokenizer, template, lm, vt, conn, tiny_towers[tower])


def write_pretrain(d, lm_sd, vt_sd, conn_sd, lm, vt, config, tokenizer):
    """The original's sub-directory layout: language_model/ vision_tower/ connector/ with pytorch_model.bin."""
    for sub, sd, cfg in (("language_model", lm_sd, lm.config), ("vision_tower", vt_sd, vt.config),
                         ("connector", conn_sd, None)):
        os.makedirs(os.path.join(d, sub))
        torch.save({k: v.detach().clone() for k, v in sd.items()}, os.path.join(d, sub, "pytorch_model.bin"))
        if cfg is not None:
            cfg.save_pretrained(os.path.join(d, sub))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.save_pretrained(d)


class Original(nn.Module):
    """The original's module tree, so PEFT names its adapters as the original's LoRA runs do."""

    def __init__(self, lm, vt, conn):
        super().__init__()
        self.language_model = lm
        self.vision_tower, self.connector = nn.Module(), nn.Module()
        self.vision_tower._vision_tower = nn.Module()
        self.vision_tower._vision_tower.vision_model = vt
        d, dv = conn["0.weight"].shape
        self.connector._connector = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))
        self.connector._connector.load_state_dict(conn)


def test_pretrain_layout_and_lora_output(tiny_llms, tiny_towers, tmp_path):
    from peft import LoraConfig, get_peft_model
    lm, vt, conn = original_parts(tiny_llms, tiny_towers, "llama", "siglip")
    tok = AutoTokenizer.from_pretrained(tiny_llms["llama"])
    config = original_config(lm, vt, tok)

    # pretrain stage: keys as recipe.save writes them ('_connector.' kept for the connector)
    pre = str(tmp_path / "pretrain")
    write_pretrain(pre, dict(lm.named_parameters()), {"vision_model." + k: v for k, v in vt.state_dict().items()},
                   {"_connector." + k: v for k, v in conn.items()}, lm, vt, config, tok)
    model, tokenizer, processor = load_pretrained(pre)
    assert model.template == "pretrain"                   # the original writes this layout for pretraining stages
    compare(model, processor, tokenizer, "llama", lm, vt, conn, tiny_towers["siglip"])

    # LoRA run: base weights with PEFT's '.base_layer', the connector's keys bare, adapters next to them
    original = Original(lm, vt, conn)
    targets = [f"language_model.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    targets.append("vision_tower._vision_tower.vision_model.encoder.layers.0.mlp.fc1")
    peft_model = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:   # PEFT starts B at zero: the adapters would be a no-op
            p.data = torch.randn(p.shape, generator=g) * 0.3
    nonlora = lambda m: {k: v for k, v in m.named_parameters() if "lora_" not in k}
    lora = str(tmp_path / "lora")
    write_pretrain(lora, nonlora(original.language_model), nonlora(original.vision_tower._vision_tower),
                   nonlora(original.connector._connector), lm, vt, config, tok)
    peft_model.save_pretrained(lora)
    assert any(".base_layer." in k for k in torch.load(f"{lora}/language_model/pytorch_model.bin", weights_only=True))
    model, tokenizer, processor = load_pretrained(lora)
    assert model.template == "llama"
    with_adapters = compare(model, processor, tokenizer, "llama", lm, vt, conn, tiny_towers["siglip"])
    with peft_model.disable_adapter():   # the adapters matter: the merge is what makes the logits agree
        ids = encode(QUESTION, "llama", tokenizer, 1, for_generation=True)["input_ids"]
        pixels = preprocess_image(picture(), processor)[None]
        without = original_logits(lm, vt, conn, ids, pixels)
    assert (with_adapters - without).abs().max() > 1e-2


class LoraTarget(nn.Module):
    """Module names as a transformers decoder has them; `conv1d`: GPT-2's Conv1D (weight [in, out]: fan_in_fan_out)."""

    def __init__(self, conv1d=False):
        from transformers.pytorch_utils import Conv1D
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.self_attn, block.mlp = nn.Module(), nn.Module()
            if conv1d:
                block.self_attn.c_attn = Conv1D(24, 16)
            else:
                block.self_attn.q_proj, block.self_attn.v_proj = nn.Linear(16, 16), nn.Linear(16, 12, bias=False)
                block.mlp.up_proj = nn.Linear(16, 24)
            self.layers.append(block)
        self.head = nn.Linear(16, 8)


LORA_CASES = {   # LoraConfig arguments; r=4, lora_alpha=8 unless given
    "plain": dict(),
    "rslora": dict(use_rslora=True),                                              # alpha / sqrt(r), not alpha / r
    "rank_pattern": dict(rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 8}),
    "alpha_pattern": dict(alpha_pattern={"v_proj": 32, r"layers\.0\..*up_proj": 3}),
    "rslora_and_patterns": dict(use_rslora=True, rank_pattern={"up_proj": 8}, alpha_pattern={"q_proj": 2}),
    "alternation_pattern": dict(alpha_pattern={"q_proj|up_proj": 2}),   # PEFT: (.*\.)?(q_proj|up_proj)$
    "fan_in_fan_out": dict(fan_in_fan_out=True, target_modules=["c_attn"]),        # Conv1D: the delta transposed
}


@pytest.mark.parametrize("kw", LORA_CASES.values(), ids=LORA_CASES.keys())
def test_merge_lora_equals_pefts_merge(kw, tmp_path):
    """folders.merge_lora (layouts.py's reader of the original's LoRA layout; QLoRA stages onto their full-precision
    base) against PEFT's own merge_and_unload of the same adapter: each layer's scale is lora_alpha / r, with rsLoRA
    lora_alpha / sqrt(r), r and alpha per layer from rank_pattern / alpha_pattern (regexes on the name's tail)."""
    from peft import LoraConfig, get_peft_model
    from folders import merge_lora
    kw = {**dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]), **kw}
    torch.manual_seed(0)
    model = LoraTarget(conv1d=kw.get("fan_in_fan_out", False))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(**kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:   # PEFT starts B at zero: the merge would be a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    weights = dict(base)
    merge_lora(weights, str(tmp_path / "adapter"))
    assert weights.keys() == merged.keys() == base.keys()
    for k, v in merged.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=k)
    moved = {k for k in base if (merged[k] - base[k]).abs().max() > 0.1}   # the adapters matter
    assert moved == {k for k in base if k.endswith(("proj.weight", "c_attn.weight"))}, moved


def test_from_tinyllava_then_finetune_and_evaluate(tiny_llms, tiny_towers, tmp_path):
    import train
    lm, vt, conn = original_parts(tiny_llms, tiny_towers, "llama", "siglip", torch.float16)
    tok = AutoTokenizer.from_pretrained(tiny_llms["llama"])
    src, dst = str(tmp_path / "release"), str(tmp_path / "ours")
    os.makedirs(src)
    write_release(src, lm, vt, conn, original_config(lm, vt, tok), tok)
    convert.main(["from-tinyllava", src, dst])
    with open(os.path.join(dst, "train_config.json")) as f:
        assert json.load(f)["template"] == "llama"        # what evaluate.py and chat.py read
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["model_type"] == "tinyllava_nano"
    model, tokenizer, processor = load_pretrained(dst)   # evaluate.py's loader
    compare(model, processor, tokenizer, "llama", lm, vt, conn, tiny_towers["siglip"])

    data, images = write_dataset(str(tmp_path / "data"), n=4, text_only=0)
    AcceleratorState._reset_state(True)
    final, losses = train.main([
        f"--init_from={dst}", "--template=llama", f"--data_finetune={data}", f"--images_finetune={images}",
        f"--out_dir={tmp_path / 'run'}", "--bf16=false", "--num_workers=0", "--warmup_ratio=0", "--lr=1e-3",
        "--max_length=256", "--global_batch_size=2", "--micro_batch_size=2", "--max_steps=1",
        "--stages=[{'name': 'finetune', 'data': 'finetune', 'tune_llm': 'full', 'tune_connector': 'full'}]"])
    AcceleratorState._reset_state(True)
    tuned, _, _ = load_pretrained(final)
    assert tuned.num_image_tokens == 15 and tuned.args.legacy_patch_drop   # the original's settings carried on
    assert all(torch.isfinite(torch.tensor(losses["finetune"])))
    assert not torch.equal(tuned.connector.state_dict()["_connector.0.weight"],
                           model.connector.state_dict()["_connector.0.weight"])


def test_unreadable_checkpoints_say_why(tiny_llms, tiny_towers, tmp_path):
    lm, vt, conn = original_parts(tiny_llms, tiny_towers, "llama", "siglip")
    tok = AutoTokenizer.from_pretrained(tiny_llms["llama"])
    write_release(str(tmp_path), lm, vt, conn, original_config(lm, vt, tok, connector="qformer"), tok, shards=1)
    with pytest.raises(ValueError, match="qformer"):
        load_pretrained(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(original_config(lm, vt, tok), vision_model_name_or_path2="facebook/dinov2-large",
                       connector_type="mof_mlp"), f)
    with pytest.raises(ValueError, match="DINOv2 config"):
        load_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------- ours -> the original
def test_to_tinyllava_writes_what_the_original_reads(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    ours = str(tmp_path / "ours")
    save_pretrained(model, tok, proc, ours)
    with open(os.path.join(ours, "train_config.json"), "w") as f:
        json.dump({"template": "llama", "max_length": 512}, f)
    out = str(tmp_path / "original")
    convert.main(["to-tinyllava", ours, out])
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "tinyllava" and cfg["connector_type"] == "mlp2x_gelu"
    assert cfg["tokenizer_model_max_length"] == 512 and cfg["conv_version"] == "llama"
    assert cfg["vision_feature_select_strategy"] == "cls_patch"   # keeps all 16 SigLIP patches, as ours did
    weights = load_file(os.path.join(out, "model.safetensors"))
    full_tower = SiglipVisionModel.from_pretrained(tiny_towers["siglip"])
    vision = {k for k in weights if k.startswith("vision_tower.")}
    assert vision == {"vision_tower._vision_tower.vision_model." + k for k in full_tower.state_dict()}

    # what the original computes from these files: full tower, hidden_states[-2], its strategy
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg["text_config"]))
    lm.load_state_dict({k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")})
    vt = SiglipVisionModel(AutoConfig.for_model(**cfg["vision_config"]))
    vt.load_state_dict({k[len("vision_tower._vision_tower.vision_model."):]: v for k, v in weights.items()
                        if k.startswith("vision_tower.")})
    conn = {k[len("connector._connector."):]: v for k, v in weights.items() if k.startswith("connector.")}
    got = compare(model.eval(), proc, tok, "llama", lm.eval(), vt.eval(), conn, tiny_towers["siglip"], drop_first=False)

    back, tok2, proc2 = load_pretrained(out)   # and our loader reads it back
    assert back.template == "llama" and back.num_image_tokens == 16
    ids = encode(QUESTION, "llama", tok2, 16, for_generation=True)["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(back(ids, images=preprocess_image(picture(), proc2)[None])["logits"], got)

    # the tower's checkpoint gone: only what our model holds is written, and it still loads
    model.args.vision_tower = str(tmp_path / "gone")
    convert.save_tinyllava(model, tok, proc, str(tmp_path / "partial"), "llama")
    assert not any(".layers.2." in k or ".head." in k for k in load_file(str(tmp_path / "partial" / "model.safetensors")))
    assert load_pretrained(str(tmp_path / "partial"))[0].num_image_tokens == 16


# ---------------------------------------------------------------------------------------------- ours -> Llava
@pytest.mark.parametrize("family,tower,legacy,spare_rows", [
    ("llama", "siglip", True, 0),    # the original's SigLIP patch drop = Llava's "default"; <image> needs a new row
    ("qwen2", "clip", False, 8),     # CLIP's CLS drop = "default"; <image> takes a spare embedding row
])
def test_export_to_llava(tiny_llms, tiny_towers, tmp_path, family, tower, legacy, spare_rows):
    llm = tiny_llms[family]
    if spare_rows:   # real vocabularies are often padded (phi-2: 51200 rows for 50295 tokens)
        config = AutoConfig.from_pretrained(llm)
        config.vocab_size += spare_rows
        torch.manual_seed(0)
        llm = str(tmp_path / "llm")
        AutoModelForCausalLM.from_config(config).save_pretrained(llm)
        AutoTokenizer.from_pretrained(tiny_llms[family]).save_pretrained(llm)
    model, tok, proc = build_model(ModelArgs(llm=llm, vision_tower=tiny_towers[tower], legacy_patch_drop=legacy))
    torch.manual_seed(0)
    for p in model.connector.parameters():   # a connector with some weight, so the image matters
        p.data.normal_(0, 0.3)
    template = "llama" if family == "llama" else "qwen2_instruct"
    out = str(tmp_path / "llava")
    convert.export_llava(model.eval(), tok, proc, out, template)

    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image = picture()
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}]
    x = encode(conv, template, tok, model.num_image_tokens, for_generation=True)["input_ids"][None]
    pixels = preprocess_image(image, proc)[None]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == x.masked_fill(x < 0, llava.config.image_token_id).tolist()
    torch.testing.assert_close(inputs["pixel_values"], pixels)
    with torch.no_grad():
        ours = model(x, images=pixels)["logits"]
        theirs = llava(**inputs).logits
    assert theirs.shape[-1] == ours.shape[-1] + (1 if not spare_rows else 0)
    torch.testing.assert_close(theirs[..., :ours.shape[-1]], ours, rtol=1e-4, atol=1e-4)
    ours_gen = model.generate(x, torch.ones_like(x), images=pixels, max_new_tokens=8, do_sample=False)
    theirs_gen = llava.generate(**inputs, max_new_tokens=8, do_sample=False)[:, x.shape[1]:]
    assert theirs_gen.tolist() == ours_gen.tolist()


def test_export_refuses_and_says_why(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["phi"], vision_tower=tiny_towers["clip"],
                                             connector="linear", image_aspect_ratio="pad"))
    with pytest.raises(ValueError) as e:
        convert.export_llava(model, tok, proc, str(tmp_path / "x"), "auto")
    for reason in ("has a bias", "connector 'linear'", "template 'auto'", "'pad'"):
        assert reason in str(e.value)
    assert not os.path.exists(tmp_path / "x")
    mof, _, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["clip"],
                                      vision_tower2=tiny_towers["dinov2"], connector="mof_mlp"))
    assert any("MoF" in w for w in convert.llava_blockers(mof, "llama"))


def test_llava_chat_template_renders_our_templates(tiny_llms):
    tok = AutoTokenizer.from_pretrained(tiny_llms["llama"])
    conv = [{"from": "human", "value": " What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "  Why?"}, {"from": "gpt", "value": "It meows."}, {"from": "human", "value": "Sure?"}]
    roles = {"human": "user", "gpt": "assistant"}
    as_list = [{"role": roles[m["from"]], "content": [{"type": "text", "text": m["value"].replace("<image>", "")}]
                + ([{"type": "image"}] if "<image>" in m["value"] else [])} for m in conv]
    as_text = [{"role": roles[m["from"]], "content": m["value"]} for m in conv]
    for name, t in TEMPLATES.items():
        if not isinstance(t, ChatTemplate):
            continue
        jinja = convert.llava_chat_template(t)
        for messages in (as_list, as_text):
            chat = lambda msgs: tok.apply_chat_template(msgs, chat_template=jinja, tokenize=False)
            assert chat(messages) == render(conv, name, for_generation=True)[0], name
            assert chat(messages[:4]) == render(conv[:4], name)[0], name


def test_model_load_pretrained_is_the_one_loader(tiny_llms, tiny_towers, tmp_path):
    """model.load_pretrained reads every layout (it never imports convert.py): the original's release layout loads
    through it; a folder it cannot read (no config.json, another model_type, a transformers Llava, which evaluate.py
    runs as itself with transformers_ok) is one line saying what it reads."""
    lm, vt, conn = original_parts(tiny_llms, tiny_towers, "llama", "siglip")
    tok = AutoTokenizer.from_pretrained(tiny_llms["llama"])
    os.makedirs(tmp_path / "release")
    write_release(str(tmp_path / "release"), lm, vt, conn, original_config(lm, vt, tok), tok, shards=1)
    assert load_pretrained(str(tmp_path / "release"))[0].template == "llama"
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json not found: not a model folder of ours, nor one of "
                                                "TinyLLaVA Factory's$"):
        load_pretrained(str(tmp_path / "empty"))
    for kind, said in [("bert", ""), ("llava", r" \(a transformers model: evaluate.py runs it\)")]:
        os.makedirs(tmp_path / kind)
        (tmp_path / kind / "config.json").write_text(json.dumps({"model_type": kind}))
        with pytest.raises(ValueError, match=f"model_type is '{kind}', expected 'tinyllava_nano' \\(ours\\) or "
                                             f"'tinyllava' \\(TinyLLaVA Factory's\\){said}$"):
            load_pretrained(str(tmp_path / kind))

"""Tiny random-init models of every supported family, saved to temp dirs and loaded back through the same
`from_pretrained` path a Hub id takes. No network: tokenizers are trained locally (tests/tiny_tokenizers.py)."""
import os
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"          # a test that reaches for the Hub fails instead of downloading
# train.py caches this machine's thread choice and matmul peak there: a fresh one per test session, not ~/.cache
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="tinyllava-test-cache-")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(min(2, torch.get_num_threads()))

from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,  # noqa: E402
                          GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel,
                          StableLmConfig, StableLmForCausalLM, BitImageProcessor)
from transformers.utils import logging as hf_logging  # noqa: E402

from tiny_tokenizers import make_tokenizer  # noqa: E402

hf_logging.set_verbosity_error()   # load reports of the towers (unexpected text-model keys) are expected noise

# family -> (config class, model class, tokenizer style, chat template of the original)
LLMS = {
    "phi": (PhiConfig, PhiForCausalLM, "phi", "phi"),
    "llama": (LlamaConfig, LlamaForCausalLM, "llama", "llama"),          # TinyLlama
    "stablelm": (StableLmConfig, StableLmForCausalLM, "phi", "phi"),     # StableLM-2 uses the phi template
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "qwen2", "qwen2_base"),
    "gemma": (GemmaConfig, GemmaForCausalLM, "gemma", "gemma"),
}
TOWER_KINDS = ("clip", "siglip", "dinov2")
IMAGE_SIZE, PATCH = 32, 8


def save_tiny_llm(family, out_dir, hidden=64, layers=2, seed=0):
    config_cls, model_cls, style, _ = LLMS[family]
    tok = make_tokenizer(style, out_dir)
    extra = {"head_dim": 16} if family == "gemma" else {}
    if family == "phi":
        extra["partial_rotary_factor"] = 0.5
    config = config_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(out_dir)
    return out_dir


def save_tiny_tower(kind, out_dir, hidden=32, layers=3, seed=0):
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**common))
        proc = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common))
        proc = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**common))
        proc = BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    else:
        raise ValueError(kind)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llms(tmp_path_factory):
    """family -> directory with a tiny random LLM and its tokenizer."""
    root = tmp_path_factory.mktemp("llms")
    return {f: save_tiny_llm(f, str(root / f)) for f in LLMS}


@pytest.fixture(scope="session")
def tiny_towers(tmp_path_factory):
    """kind -> directory with a tiny random vision tower and its image processor."""
    root = tmp_path_factory.mktemp("towers")
    return {k: save_tiny_tower(k, str(root / k)) for k in TOWER_KINDS}


def write_dataset(root, n=16, text_only=4, seed=0):
    """A small LLaVA-format set: n image samples (coloured squares; question about the colour) and text-only ones."""
    from PIL import Image
    import json
    import random
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    records = []
    for i in range(n):
        name = rng.choice(sorted(colors))
        Image.new("RGB", (40, 24), colors[name]).save(os.path.join(root, "images", f"{i}.png"))
        q = "What color is the square?" if i % 3 else "Describe the picture in detail."
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": f"A {name} square."}]
        if i % 4 == 0:
            conv += [{"from": "human", "value": "Is it sunny?"}, {"from": "gpt", "value": "No."}]
        records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": conv})
    for i in range(text_only):
        records.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": "Why is the sky blue?"},
                                                          {"from": "gpt", "value": "Because air scatters blue light."}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, os.path.join(root, "images")


def run_train(argv):
    """train.main in this process, Accelerate's singletons reset before and after (tests run many trainings)."""
    import train
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    try:
        return train.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(True)


def crash_after_checkpoint(monkeypatch, at_step):
    """The run dies (KeyboardInterrupt: nothing of ours catches it) right after writing step `at_step`'s checkpoint."""
    import train
    real = train.save_checkpoint

    def save(accelerator, work_dir, step, *rest):
        real(accelerator, work_dir, step, *rest)
        if step == at_step:
            raise KeyboardInterrupt(f"killed after the checkpoint of step {step}")
    monkeypatch.setattr(train, "save_checkpoint", save)

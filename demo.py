"""
The embedded demo: train a tiny vision-language model on real handwritten digits (shipped in demo/) on a CPU,
through the same code as the real configs, then score it on the held-out split with evaluate.py's scorers.

    python demo.py                  # about 3.5 minutes on 2 CPU cores, no network; held-out accuracy ~56-68
    python demo.py --finetune.epochs=2 --seed=1   # any train.py key can be overridden, as with train.py
    python demo.py --resume        # continue an interrupted demo (otherwise each run starts over in out/demo/)

The LLM (Llama architecture, 4 layers x 192) and the SigLIP tower (4 layers x 128, 32 px, patch 16: a 2x2 grid,
4 image tokens) are built from configs with random weights and saved to out/demo/base/, then loaded back through
from_pretrained like a Hub model.
"""
import os
import sys
import time

import torch

BASE = "out/demo/base"


def make_base_models(base=BASE, seed=0):
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained("demo/tokenizer")
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=576, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    llm.save_pretrained(f"{base}/llm")
    tok.save_pretrained(f"{base}/llm")
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                                 num_attention_heads=4, image_size=32, patch_size=16))
    tower.save_pretrained(f"{base}/siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(f"{base}/siglip")


def main(argv):
    if {"-h", "--help"} & set(argv):
        return print(__doc__)
    if "--resume" not in argv and not any(a.startswith("--resume=") for a in argv):
        argv = ["--overwrite", *argv]   # a demo run starts over: out/demo/ holds only the last one
    import evaluate
    import train
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    t0 = time.time()
    if not os.path.isfile(f"{BASE}/llm/config.json"):
        make_base_models()
    model_dir, results = train.main(["--config", "configs/demo.py", *argv])
    t_train = time.time() - t0
    vqa, = evaluate.main(["--model", model_dir, "--bench", "vqav2", "--data", "demo/eval/vqav2", "--image-folder",
                          "demo/images", "--questions", "demo/eval/vqav2/llava_vqav2_demo_val.jsonl",
                          "--annotations", "demo/eval/vqav2/demo_val_annotations.json", "--batch-size", "32"])
    pope, = evaluate.main(["--model", model_dir, "--bench", "pope", "--data", "demo/eval",
                           "--image-folder", "demo/images", "--batch-size", "32"])
    for stage, losses in results.items():
        print(f"{stage}: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} ({len(losses)} steps)")
    pope = pope["metrics"]["splits"]["random"]
    print(f"held-out VQAv2-style accuracy {vqa['metrics']['overall']:.1f} (majority baseline 29.8) | "
          f"POPE-style F1 {100 * pope['f1']:.1f}, acc {100 * pope['accuracy']:.1f} "
          f"(always-yes baseline acc 50.0) | train {t_train:.0f} s, total {time.time() - t0:.0f} s "
          f"on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main(sys.argv[1:])

"""
The embedded demo: train a tiny vision-language model on real handwritten digits (shipped in demo/) on a CPU,
through the same code as the real configs, then score it on the held-out split with evaluate.py's scorers.

    python demo.py                  # about 5 CPU-minutes (1 thread), no network; held-out accuracy per type
    python demo.py --seed=1 --finetune.epochs=3    # any train.py key can be overridden, as with train.py
    python demo.py --resume         # continue an interrupted demo (otherwise each run starts over in out/demo/)
    python demo.py --only-base      # only build and save the random-init base models in out/demo-base/
    python demo.py --eval-images=20 # score the questions of the first 20 held-out images only (a quick look)

The LLM (Llama architecture) and the SigLIP tower are built from the configs below with random weights and saved
to out/demo-base/, then loaded back through from_pretrained like a Hub model (configs/demo.py names them).
"""
import json
import os
import re
import shutil
import sys
import time

BASE = "out/demo-base"   # beside the run's out_dir, which holds only what train.py writes
LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
TOWER = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=32,
             patch_size=16)   # 32 px in patches of 16: a 2x2 grid, 4 image tokens (3 of the 4 layers are used)


def make_base_models(base=BASE, seed=0, tokenizer="demo/tokenizer", llm=None, tower=None):
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)
    llm, tower = llm or LLM, tower or TOWER
    import torch
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, **llm))
    model.save_pretrained(f"{base}/llm")
    tok.save_pretrained(f"{base}/llm")
    SiglipVisionModel(SiglipVisionConfig(**tower)).save_pretrained(f"{base}/siglip")
    size = tower["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(f"{base}/siglip")


TYPES = ["digit", "color", "background", "even", "gt4", "same", "detail"]   # the held-out questions' categories
QUESTIONS, ANSWERS = "demo/eval/vqav2/llava_vqav2_demo_val.jsonl", "demo/eval/vqav2/demo_val_annotations.json"
PAIRS = "demo/eval/pairs"   # two-image questions (issue 26): "Are these the same digit?", half yes
DETAIL = "demo/eval/detail"   # issue 28: "What digit is shown?" of a 64x64 canvas, the digit 8 px: tiling reads it


def constant_baselines():
    """What a model that learned nothing about the images scores per type: the best constant answer's held-out
    accuracy (the type's most frequent held-out answer). POPE-style: accuracy 50 whatever it answers (one yes and
    one no per image)."""
    with open(ANSWERS) as f:
        anns = json.load(f)["annotations"]
    by_type = {}
    for a in anns:
        by_type.setdefault(a["question_type"], []).append(a["multiple_choice_answer"])
    with open(f"{PAIRS}/answers.jsonl") as f:
        by_type["same"] = [json.loads(line)["answers"][0] for line in f]
    with open(f"{DETAIL}/answers.jsonl") as f:
        by_type["detail"] = [json.loads(line)["answers"][0] for line in f]
    return {t: 100 * max(map(v.count, set(v))) / len(v) for t, v in by_type.items()}


def per_type(custom, pope, *more):
    """{type: accuracy} from the custom benchmarks' categories (exact match after VQA normalisation), plus
    POPE-style F1, accuracy and yes-ratio (percent)."""
    cats = {k: v for r in (custom, *more) if r for k, v in r["metrics"]["categories"].items()}
    out = {t: cats[t]["exact_match"] for t in TYPES if t in cats}
    p = pope["metrics"]["splits"]["random"]
    out.update(pope_f1=100 * p["f1"], pope_acc=100 * p["accuracy"], pope_yes=100 * p["yes_ratio"])
    return out


def forget_features(cache):
    """A fresh demo run trains a new tower, so the feature cache's entries of earlier runs (a folder per tower, named
    by its 20-hex-digit fingerprint) go, as their stage folders do; nothing else in `cache` is touched."""
    if os.path.isdir(cache):
        for name in os.listdir(cache):
            path = os.path.join(cache, name)
            if re.fullmatch("[0-9a-f]{20}", name) and os.path.isdir(path) and not os.path.islink(path):
                print(f"demo.py: deleting {path} (an earlier demo run's feature cache)")
                shutil.rmtree(path)


def main(argv):
    """Train and score the demo; returns the held-out scores (per type, POPE-style). Besides train.py's keys:
    --only-base (build the base models, nothing else), --eval-images=N (score the questions of N held-out images);
    its own flags and train.py's keys are taken in either spelling (--eval_images, --max-steps)."""
    from settings import Int, say
    if {"-h", "--help"} & set(argv):
        return say(__doc__)
    own, rest, args = {}, [], list(argv)   # demo.py's own flags, either spelling (--eval-images N, --eval_images=N)
    while args:
        flag, eq, value = args.pop(0).partition("=")
        name = flag.replace("_", "-")
        if name == "--eval-images" and not eq and args and not args[0].startswith("--"):
            value = args.pop(0)
        if name in ("--only-base", "--eval-images"):
            own[name] = Int(1).check(flag, value) if name == "--eval-images" else True
        else:
            rest.append(flag + eq + value)
    if "--only-base" in own:
        make_base_models(BASE)
        return say(f"random-init base models written to {BASE}/llm and {BASE}/siglip")
    n_images, argv = [own[k] for k in own if k == "--eval-images"], rest
    limit = ["--limit", str(5 * n_images[-1])] if n_images else []   # 5 VQAv2-style questions per image
    fresh = "--resume" not in argv and not any(a.startswith("--resume=") for a in argv)
    if fresh:
        argv = ["--overwrite", *argv]   # a demo run starts over: out/demo/ holds only the last one
    argv = ["--config", "configs/demo.py", f"--llm={BASE}/llm", f"--vision_tower={BASE}/siglip", *argv]
    from recipes import load_config, stage_configs
    cfg = load_config(argv)
    stage_configs(cfg)   # every key and value, before torch loads (train.main checks the rest)
    if not any(a.replace("-", "_").split("=")[0] == "__feature_cache" for a in argv):
        cache = os.path.join(cfg["out_dir"], "features")   # the demo's feature cache lives in its out_dir
        argv.append(f"--feature_cache={cache}")
        if fresh:
            forget_features(cache)
    import torch

    import evaluate
    import train
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    t0, c0 = time.time(), time.process_time()
    if not os.path.isfile(f"{BASE}/llm/config.json"):
        make_base_models(BASE)
    model_dir, results = train.main(argv)
    t_train = time.time() - t0
    threads = ["--threads", str(torch.get_num_threads())]   # what the training ran on
    # your own benchmark's path (evaluate.py --bench custom): questions with a category each, VQA-style references
    custom, = evaluate.main(["--model", model_dir, "--bench", "custom", "--questions", QUESTIONS, "--annotations",
                             ANSWERS, "--image-folder", "demo/images", "--batch-size", "64", *threads, *limit])
    pairs, = evaluate.main(["--model", model_dir, "--bench", "custom", "--questions", f"{PAIRS}/questions.jsonl",
                            "--annotations", f"{PAIRS}/answers.jsonl", "--image-folder", "demo/images", "--batch-size",
                            "64", *threads, *(limit and ["--limit", str(n_images[-1])])])
    detail, = evaluate.main(["--model", model_dir, "--bench", "custom", "--questions", f"{DETAIL}/questions.jsonl",
                             "--annotations", f"{DETAIL}/answers.jsonl", "--image-folder", "demo/images",
                             "--batch-size", "64", *threads, *(limit and ["--limit", str(n_images[-1])])])
    pope, = evaluate.main(["--model", model_dir, "--bench", "pope", "--data", "demo/eval", "--image-folder",
                           "demo/images", "--batch-size", "64", *threads, *(limit and ["--limit", str(2 * n_images[-1])])])
    for stage, losses in results.items():
        print(f"{stage}: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} ({len(losses)} steps)")
    scores = per_type(custom, pope, pairs, detail)
    with open(os.path.join(model_dir, "demo_scores.json"), "w") as f:
        json.dump(scores, f, indent=1)
    print("held-out accuracy per question type (best constant answer): " + ", ".join(
        f"{k} {scores[k]:.1f} ({b:.1f})" for k, b in constant_baselines().items() if k in scores))
    print(f"POPE-style \"Is there a D in the image?\": F1 {scores['pope_f1']:.1f}, accuracy {scores['pope_acc']:.1f}, "
          f"yes-ratio {scores['pope_yes']:.0f}% (always yes: F1 66.7, accuracy 50.0) | train {t_train:.0f} s, total "
          f"{time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU, {torch.get_num_threads()} thread(s)")
    return scores


if __name__ == "__main__":
    from recipes import ConfigError
    try:
        main(sys.argv[1:])
    except ConfigError as e:   # a mistake in the command: each problem on a line, no traceback (as train.py)
        print("\n".join(f"demo.py: error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # Ctrl-C: what was kept and the command that continues, in one line
        from checkpoints import interrupted
        sys.exit(interrupted("demo.py", sys.argv[1:]))

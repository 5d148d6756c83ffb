"""
Speed, measured: training-step and evaluation throughput of a ~20M-parameter model, each optimisation switched
on alone and all together, as ratios to the unoptimised loop, in one run (this machine is noisy).

    python bench.py                          # CPU: Llama 384 x 6 (32k vocab) + SigLIP 256 x 4 at 224 px
    python bench.py --device cuda --dtype bfloat16 --micro-batch 16 --steps 20
    python bench.py --only pretrain --steps 3          # one stage; also: finetune, eval, loss

Reports samples/s, tokens/s (non-padding tokens), MFU, padding fraction and peak memory (RSS on CPU, allocated on
GPU; each variant runs in its own process, so peaks do not leak between them). MFU = model FLOPs / time / peak,
the peak measured here by timing large matmuls in the run's dtype (the bf16 peak is measured and printed too).
Each variant runs its timed steps --rounds times and reports the fastest round.
Model FLOPs (train_flops, the same accounting train.py logs): 2 per multiply-add of every Linear and 4*T^2*d per
attention layer (nanoGPT/PaLM, no causal halving), LM head only where the loss needs it, padding excluded; the
tower and connector counted exactly once per image by torch's FlopCounterMode; frozen parts forward only, plus
the activation gradients that flow through them to a trainable part below.

The unoptimised loop is the original's: the frozen tower runs all its layers with autograd recording, text-only
rows get a zero image through the tower, logits over the whole vocabulary, random batches. Optimisations:
  tower     frozen tower truncated at the feature layer, without autograd     (model.truncate_tower, tower_no_grad)
  no_zero   text-only rows never see the tower                                   (what model.py always does)
  loss      LM head only at supervised positions, chunked there                  (model.supervised_only_loss)
  group     length- and modality-grouped batches                                 (train.grouped_batches)
  cache     frozen tower outputs computed once, read from disk                   (model.FeatureCache)
  compile   torch.compile of the LLM's decoder                                   (train.py --compile)
  ckpt      gradient checkpointing: memory for time, so not in "all"             (train.py --gradient_checkpointing)
`--only loss` times the LM-head loss alone at Gemma's 256k vocabulary: the supervised positions' logits at once
against LinearCrossEntropy's chunks (model.chunked_loss), where the bench model's few-token answers cannot show it.
Peak memory on CPU is the peak RSS (VmHWM) from the first training step on, so the model build's transients are
left out; "step MiB" subtracts the RSS before the model was built (the interpreter and libraries), and the memory
ratio is of that. The dtype is bf16 on a GPU; on a CPU, whichever of fp32 and bf16 has the higher measured matmul
peak (bf16 wins where the CPU has bf16 units: AVX512-BF16, AMX).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
OPTS = ["tower", "no_zero", "loss", "group", "cache", "compile", "ckpt"]
STAGES = {  # the demo's data (real digits, shipped), a recipe stage each
    "pretrain": dict(data="demo/pretrain.json", template="pretrain", tune=("connector",)),
    "finetune": dict(data="demo/finetune.json", template="phi", tune=("llm", "connector")),
}


# FLOPs and the peak: flops.py owns them (train.py logs the same count); imported here, not the reverse
from flops import flop_profile, image_flops, linear_params, matmul_peak, train_flops  # noqa: E402,F401


def rss_now():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def reset_peak(device):
    """Start a fresh peak-memory window (the step's, not the model build's transients)."""
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass   # no reset: the peak then also covers building the model


def peak_memory(device):
    if device != "cpu":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


# --------------------------------------------------------------------------------------- the bench model
SIZES = {  # hidden, layers, heads, FFN of the LLM; the same of the tower; image px; vocabulary
    "bench": dict(llm=(384, 6, 6, 1024), tower=(256, 4, 4, 1024), px=224, vocab=32000),
    "tiny": dict(llm=(64, 2, 2, 128), tower=(32, 1, 2, 64), px=64, vocab=1024),   # tests/test_perf.py: seconds
}


def make_base(root, size="bench", seed=0):
    """The bench model's parts, random init, saved like Hub checkpoints (built once per root, reused)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, SiglipImageProcessor, SiglipVisionConfig, \
        SiglipVisionModel
    if os.path.isfile(f"{root}/siglip/config.json"):
        return
    torch.manual_seed(seed)
    (h, n, heads, ffn), (vh, vn, vheads, vffn), px = SIZES[size]["llm"], SIZES[size]["tower"], SIZES[size]["px"]
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "demo/tokenizer"))  # 525 real tokens; logits over 32k
    LlamaForCausalLM(LlamaConfig(vocab_size=SIZES[size]["vocab"], hidden_size=h, intermediate_size=ffn,
                                 num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=heads,
                                 max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                     ).save_pretrained(f"{root}/llm")
    tok.save_pretrained(f"{root}/llm")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=vh, intermediate_size=vffn, num_hidden_layers=vn,
                                         num_attention_heads=vheads, image_size=px, patch_size=16)
                      ).save_pretrained(f"{root}/siglip")
    SiglipImageProcessor(size={"height": px, "width": px}).save_pretrained(f"{root}/siglip")


def build(root, opts, dtype):
    from model import ModelArgs, build_model
    # the original runs every tower layer (and the post-norm): as costly as keeping all layers here
    layer = -2 if "tower" in opts else -1
    model, tok, proc = build_model(ModelArgs(llm=f"{root}/llm", vision_tower=f"{root}/siglip", dtype=dtype,
                                             vision_feature_layer=layer))
    model.tower_no_grad = "tower" in opts
    model.supervised_only_loss = "loss" in opts
    return model, tok, proc


# ---------------------------------------------------------------------------------------- one variant
def run_train(a, stage, opts):
    """One variant in this process: returns its measurements."""
    from data import VLMDataset, collate
    from model import FeatureCache, image_size
    from train import grouped_batches
    torch.manual_seed(0)
    spec = STAGES[stage]
    before = rss_now()
    model, tok, proc = build(a.root, opts, a.dtype)
    model.to(a.device)
    for name, part in [("llm", model.language_model), ("vision_tower", model.vision_tower),
                       ("connector", model.connector)]:
        part.requires_grad_(name in spec["tune"])
    # model FLOPs count the useful work only: the truncated tower, real images (not the zero ones)
    profile = flop_profile(model, image_size(proc))
    if "tower" not in opts:
        profile["per_image"] = image_flops(build(a.root, ["tower"], a.dtype)[0].to(a.device), image_size(proc))
    ds = VLMDataset(os.path.join(ROOT, spec["data"]), tok, proc, spec["template"], model.num_image_tokens, 2048,
                    os.path.join(ROOT, "demo/images"))
    batches = grouped_batches(ds.lengths, a.micro_batch, seed=0, group_by_length="group" in opts)
    batches = batches[:a.warmup + a.steps]
    cache = None
    if "cache" in opts:   # filled before timing, as train.py does before a stage (its cost is reported apart)
        cache = ds.feature_cache = FeatureCache(os.path.join(a.root, "cache"), model, proc)
        t0 = time.time()
        cache.fill(model, [ds.records[i]["image"] for b in batches for i in b if ds.records[i].get("image")],
                   os.path.join(ROOT, "demo/images"))
        fill_s = time.time() - t0
    data = [collate([ds[i] for i in b], tok.pad_token_id) for b in batches]
    if "compile" in opts:   # as train.py --compile
        model.language_model.get_decoder().compile()
    if "ckpt" in opts:      # as train.py --gradient_checkpointing
        model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.language_model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=False)
    model.train()   # as train.py: HF checkpointing only recomputes in train mode
    reset_peak(a.device)   # the window: warm-up (optimizer state appears) and timed steps
    sync = torch.cuda.synchronize if a.device != "cpu" else (lambda: None)

    def step(b):
        b = {k: v.to(a.device) if torch.is_tensor(v) else v for k, v in b.items()}
        feats, images = None, b["images"]
        if "no_zero" not in opts and cache is None:   # the original: every row through the tower, zeros if no image
            has = (b["input_ids"] == -200).any(1)
            full = torch.zeros(len(has), 3, *image_size(proc), device=a.device)
            if images is not None:
                full[has] = images
            feats, images = model.encode_images(full)[has], None
        out = model(b["input_ids"], b["attention_mask"], labels=b["labels"], images=images, image_features=feats,
                    tower_features=b["tower_features"])
        (out["loss_sum"] / out["num_tokens"].clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in data[:a.warmup]:
        step(b)
    timed, dt = data[a.warmup:], float("inf")
    for _ in range(a.rounds):   # the same timed steps a few times; the fastest round counts (timeit's rule)
        sync()
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        sync()
        dt = min(dt, time.perf_counter() - t0)
    samples = sum(b["input_ids"].shape[0] for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(b["attention_mask"].numel() for b in timed)
    flops = sum(train_flops(profile, b["attention_mask"], b["labels"],
                            b["tower_features"].shape[0] if b["tower_features"] is not None else
                            0 if b["images"] is None else b["images"].shape[0], tower_runs=cache is None)
                for b in timed)
    result = {"samples_s": samples / dt, "tokens_s": tokens / dt, "flops_s": flops / dt,
              "padding": 1 - tokens / padded, "peak_mib": peak_memory(a.device), "seconds": dt,
              "step_mib": peak_memory(a.device) - (before if a.device == "cpu" else 0)}
    if cache is not None:
        result["cache_fill_s"] = fill_s
    return result


def run_eval(a, batch_size, new_tokens):
    """Batched greedy answers to demo VQA questions through evaluate.answer (the real code path)."""
    import evaluate
    torch.manual_seed(0)
    model, tok, proc = build(a.root, OPTS, a.dtype)
    model.to(a.device)
    for p in model.connector.parameters():   # a random connector makes every answer alike; vary it a little
        p.data.normal_(0, 0.5)
    items = evaluate.load_questions("vqav2", os.path.join(ROOT, "demo/eval/vqav2/llava_vqav2_demo_val.jsonl"))
    items = items[:a.eval_questions]
    with tempfile.TemporaryDirectory() as tmp:
        evaluate.answer(model, tok, proc, items[:batch_size], os.path.join(ROOT, "demo/images"), "phi",
                        os.path.join(tmp, "warm.jsonl"), batch_size, new_tokens, min_new_tokens=new_tokens)
        dt = float("inf")
        for r in range(a.rounds):   # the fastest round counts
            t0 = time.perf_counter()
            rows = evaluate.answer(model, tok, proc, items, os.path.join(ROOT, "demo/images"), "phi",
                                   os.path.join(tmp, f"a{r}.jsonl"), batch_size, new_tokens, min_new_tokens=new_tokens)
            dt = min(dt, time.perf_counter() - t0)
    return {"samples_s": len(rows) / dt, "tokens_s": len(rows) * new_tokens / dt, "peak_mib": peak_memory(a.device),
            "seconds": dt, "answers": [r["text"] for r in rows]}


def run_loss(a, chunked, rows=1024, dim=256, vocab=256000):
    """The LM-head loss alone at Gemma's vocabulary, forward + backward: the supervised positions' logits at once
    (model.chunked_loss = False) or LinearCrossEntropy's chunks (the default)."""
    import torch.nn.functional as F
    from model import LOSS_CHUNK, LinearCrossEntropy
    torch.manual_seed(0)
    weight = torch.randn(vocab, dim, device=a.device, requires_grad=True)
    hidden = torch.randn(rows, dim, device=a.device, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), device=a.device)
    before = rss_now() if a.device == "cpu" else torch.cuda.memory_allocated() / 2 ** 20
    reset_peak(a.device)
    t0 = time.perf_counter()
    if chunked:
        loss = LinearCrossEntropy.apply(hidden, weight, None, targets, None, LOSS_CHUNK // vocab, True)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    loss.backward()
    if a.device != "cpu":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "step_mib": peak_memory(a.device) - before, "loss": float(loss)}


# ------------------------------------------------------------------------------------------ the driver
def variant(a, kind, arg):
    """Run one variant in a fresh process (clean peak memory); returns its JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_variant", json.dumps([kind, arg])] + a.passthrough
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"variant {kind} {arg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="bench model and feature cache (default: out/bench[-tiny])")
    p.add_argument("--size", default="bench", choices=list(SIZES), help="tiny: a seconds-long smoke run (tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 (default: bfloat16 on GPU; on CPU the one with the higher matmul peak)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="times the timed steps run; the fastest round counts")
    p.add_argument("--only", default="pretrain,finetune,eval,loss")
    p.add_argument("--variants", default="", help="comma-separated optimisation sets to run, e.g. 'none,all,loss'")
    p.add_argument("--eval-questions", type=int, default=32)
    p.add_argument("--new-tokens", default="1,8,64", help="answer lengths to time (forced: min = max new tokens)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    a, _ = p.parse_known_args(argv)
    a.root = a.root or os.path.join(ROOT, "out", "bench" if a.size == "bench" else f"bench-{a.size}")
    if a._variant:   # a child (its dtype set by the parent): one measurement, JSON on the last stdout line
        kind, arg = json.loads(a._variant)
        result = (run_eval(a, *arg) if kind == "eval" else run_loss(a, arg) if kind == "loss" else
                  run_train(a, kind, arg))
        print(json.dumps(result))
        return None
    os.makedirs(a.root, exist_ok=True)
    make_base(a.root, a.size)
    peaks = {"bfloat16": matmul_peak(torch.bfloat16, a.device, n=None if a.device != "cpu" else 512)}
    if a.device == "cpu":
        peaks["float32"] = matmul_peak(torch.float32, a.device)
    a.dtype = a.dtype or max(peaks, key=peaks.get)
    if a.dtype not in peaks:
        peaks[a.dtype] = matmul_peak(getattr(torch, a.dtype), a.device)
    peak, peak_bf16 = peaks[a.dtype], peaks["bfloat16"]
    a.passthrough = [x for x in (argv if argv is not None else sys.argv[1:]) if not x.startswith("--_variant")]
    a.passthrough += ["--dtype", a.dtype]
    print(f"{a.device} {a.dtype}: measured matmul peak " +
          ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()) + f"; {torch.get_num_threads()} threads")
    best = [o for o in OPTS if o not in ("compile", "ckpt")]
    sets = {"none": [], **{f"+{o}": [o] for o in OPTS}, "all": best, "all+compile": best + ["compile"],
            "all+ckpt": best + ["ckpt"]}
    if a.variants:
        sets = {k: v for k, v in sets.items() if k in a.variants.split(",")}
    report = {"device": a.device, "dtype": a.dtype, "peak_flops": peak, "peak_flops_bf16": peak_bf16}
    for stage in [s for s in ("pretrain", "finetune") if s in a.only.split(",")]:
        rows = {}
        for name, opts in sets.items():
            rows[name] = r = variant(a, stage, opts)
            r["mfu"] = r["flops_s"] / peak
        base = rows.get("none")
        print(f"\n{stage} (micro-batch {a.micro_batch}, {a.steps} timed steps, best of {a.rounds} rounds)\n"
              f"{'variant':<13}{'samples/s':>10}{'tokens/s':>10}{'MFU':>7}{'padding':>9}{'peak MiB':>10}"
              f"{'step MiB':>10}{'x samples/s':>12}{'x memory':>10}")
        for name, r in rows.items():
            print(f"{name:<13}{r['samples_s']:>10.2f}{r['tokens_s']:>10.0f}{100 * r['mfu']:>6.1f}%"
                  f"{100 * r['padding']:>8.1f}%{r['peak_mib']:>10.0f}{r['step_mib']:>10.0f}" +
                  (f"{r['samples_s'] / base['samples_s']:>12.2f}{r['step_mib'] / base['step_mib']:>10.2f}"
                   if base else ""))
        report[stage] = rows
    for n in [int(x) for x in a.new_tokens.split(",")] if "eval" in a.only.split(",") else []:
        one, batched = variant(a, "eval", [1, n]), variant(a, "eval", [16, n])
        same = one.pop("answers") == batched.pop("answers")
        print(f"\neval ({a.eval_questions} questions, {n} new tokens each): batch 1 {one['samples_s']:.2f} "
              f"samples/s | batch 16 {batched['samples_s']:.2f} samples/s | x{batched['samples_s'] / one['samples_s']:.2f}"
              f" | identical answers: {same}")
        report[f"eval_{n}"] = {"batch1": one, "batch16": batched, "identical_answers": same}
    if "loss" in a.only.split(","):
        whole, chunked = variant(a, "loss", False), variant(a, "loss", True)
        print(f"\nLM-head loss, 1024 supervised tokens x 256k vocabulary (forward + backward): logits at once "
              f"{whole['step_mib']:.0f} MiB {whole['seconds']:.2f} s | chunked {chunked['step_mib']:.0f} MiB "
              f"{chunked['seconds']:.2f} s | x memory {chunked['step_mib'] / whole['step_mib']:.2f}, "
              f"x time {chunked['seconds'] / whole['seconds']:.2f}")
        report["loss"] = {"logits_at_once": whole, "chunked": chunked}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

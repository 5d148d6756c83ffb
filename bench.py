"""
Speed and memory of training on shapes that stand for real runs, ours against a re-creation of the original's
loop, alternating in one run; where our step's time goes; how fast the scripts start.

    python bench.py                       # the representative shapes + start-up times (~15 min on 2 cores)
    python bench.py --shapes phi2_siglip --stages finetune --variants ours,ours+tiles4,ours+tiles4+ps3   # tiling
    python bench.py --shapes head_heavy   # the issue-#7 bench model, a labelled extra (its head costs more than its LLM)
    python bench.py --only run,eval       # train.py end to end on tiny_original; issue #7's answering and loss
    python bench.py --variants original,ours,ours+cache,ours+bf16 --device cuda --micro-batch 16

Shapes (SHAPES). phi2_siglip: TinyLLaVA-Phi-2-SigLIP (Phi-2 2560 x 32 layers, 51,200 vocabulary; SigLIP-so400m
1152 x 27 layers, 729 image tokens) with widths and token counts / 9, layers / 4, vocabulary / 36, so each part
(LLM body, attention, head, tower) keeps its share of the FLOPs and bytes (tests/test_perf.py checks the shares
against full size; the connector grows from 0.3% to 1.3%). Synthetic text, lengths assumed at full size: captions
of 8-24 tokens, prompts of 40-260 and answers of 10-110. tiny_original: the original's own tiny setup, Llama 256 x 4
layers, 688 vocabulary, SigLIP 256 x 4 at 224 px / patch 16 (195 image tokens after the original's first-patch drop),
the demo's first 200 captions and 240 conversations (5% text-only), batch 8, fp32.

The original's loop, re-created (its code cannot run here): what HF Trainer runs for TinyLLaVA Factory at its
scripts' settings. Checkpointing of the LLM's layers; the frozen tower whole (every layer, the post-norm) without
autograd; text-only rows through the tower on a zero image; logits at every position over the whole vocabulary and
their mean cross-entropy; random batches (finetune: modality-grouped); AdamW; HF's gelu_new as written. Not
modelled: DeepSpeed, HF Trainer's overhead, loader workers, its Python splice loop, torch 2.0 / transformers 4.40.
"ours" is train.py's step: the tower cut at the feature layer, no zero images, the LM head only at supervised
positions and chunked, length-grouped batches, gelu_new as one kernel, fused AdamW, no checkpointing (auto's
choice when the step fits; "ours+ckpt": on). Extras: "ours+cache" (model.FeatureCache), "ours+bf16" (autocast).
Tiling (#28): "ours+tilesN": max_tiles=N; "+psS": connector pixel_shuffleS_mlp2x_gelu. Synthetic samples carry noise
pictures sized as LLaVA-1.5's finetune images (PICTURES), scaled as the tower's input is (126 / 384 px): same grids.

Same samples for every loop, collated before timing; each variant in its own process, alternating --rounds times.
samples/s: median; x 1st: median of per-round ratios to the first of --variants [lowest-highest]. Tokens (tok/s, img
tok per image, tok/smp per sample) count text, image and newline positions. MFU: model FLOPs (flops.py, every view
through the tower) / time / the best matmul peak of the run, in its dtype. step MiB: peak of the step's live tensors,
not the weights (first step, longest batch; flops.TensorMemory: what a GPU allocator holds). RSS+ MiB: peak RSS over
the steps above the RSS before them (+ allocator cache, fragmentation, lazy start-up); proc MiB: its peak RSS.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
# (family, hidden, layers, heads, FFN, vocabulary) of the LLM; (hidden, layers, heads, FFN, px, patch) of the tower
PHI2, SO400M = ("phi", 2560, 32, 32, 10240, 51200), (1152, 27, 16, 4304, 384, 14)
SHAPES = {
    "phi2_siglip": dict(llm=("phi", 288, 8, 4, 1152, 1422), tower=(128, 7, 2, 478, 126, 14), full=(PHI2, SO400M),
                        scale=9, data="synthetic", legacy_patch_drop=False, samples=dict(pretrain=48, finetune=48),
                        # token ranges at full size: (prompt, answer); pretrain: the caption is the answer
                        text=dict(pretrain=((0, 0), (8, 24)), finetune=((40, 260), (10, 110)))),
    "tiny_original": dict(llm=("llama", 256, 4, 4, 1024, 688), tower=(256, 4, 4, 1024, 224, 16), data="demo",
                          legacy_patch_drop=True, samples=dict(pretrain=200, finetune=240)),
    "head_heavy": dict(llm=("llama", 384, 6, 6, 1024, 32000), tower=(256, 4, 4, 1024, 224, 16), data="demo",
                       legacy_patch_drop=False, samples=dict(pretrain=64, finetune=64)),
    "smoke": dict(llm=("phi", 64, 2, 2, 256, 1024), tower=(32, 3, 2, 64, 42, 14), full=((
        "phi", 128, 2, 2, 512, 2048), (64, 3, 2, 128, 84, 14)), scale=2, data="synthetic", legacy_patch_drop=False,
        samples=dict(pretrain=4, finetune=4), text=dict(pretrain=((0, 0), (2, 6)), finetune=((4, 12), (2, 6)))),
}
REPRESENTATIVE = ["phi2_siglip", "tiny_original"]
VARIANTS = ("original", "ours", "ours+ckpt", "ours+cache", "ours+bf16", "ours+tiles4", "ours+tiles9", "ours+tiles4+ps3",
            "ours+tiles9+ps3", "ours+tiles4+ps2")
PARTS = ("train", "startup", "run", "eval")
PICTURES = [(640, 480)] * 4 + [(640, 427), (480, 640), (427, 640), (800, 600), (500, 375), (500, 333), (332, 500),
                               (1024, 768)]   # w x h, in turn: COCO 7 in 12, VG / GQA 3, OCR-VQA 1, TextVQA 1
STAGES = {"pretrain": dict(template="pretrain", data="demo/pretrain.json", trains=("connector",)),
          "finetune": dict(template="phi", data="demo/finetune.json", trains=("language_model", "connector"))}


# ------------------------------------------------------------------------------------ shapes and their FLOPs
def synthetic_lengths(shape, stage, n, scale=None, seed=0):
    """(prompt, answer) text tokens of n samples, drawn in the shape's full-size ranges and divided by its scale."""
    import random
    rng, s = random.Random(seed), scale or SHAPES[shape]["scale"]
    (p0, p1), (a0, a1) = SHAPES[shape]["text"][stage]
    return [(round(rng.randint(p0, p1) / s), max(1, round(rng.randint(a0, a1) / s))) for _ in range(n)]


def make_base(root, shape, seed=0):
    """The shape's LLM and tower, random init, saved like Hub checkpoints (built once per root, then reused)."""
    if os.path.isfile(f"{root}/siglip/config.json"):
        return
    import torch
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM,
                              SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(seed)
    (family, h, n, heads, ffn, vocab), (vh, vn, vheads, vffn, px, patch) = SHAPES[shape]["llm"], SHAPES[shape]["tower"]
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "demo/tokenizer"))   # 525 tokens; the head is `vocab`
    common = dict(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=n,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = PhiForCausalLM(PhiConfig(partial_rotary_factor=0.4, **common)) if family == "phi" else \
        LlamaForCausalLM(LlamaConfig(**common))
    lm.save_pretrained(f"{root}/llm")
    tok.save_pretrained(f"{root}/llm")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=vh, intermediate_size=vffn, num_hidden_layers=vn,
                                         num_attention_heads=vheads, image_size=px, patch_size=patch)
                      ).save_pretrained(f"{root}/siglip")
    SiglipImageProcessor(size={"height": px, "width": px}).save_pretrained(f"{root}/siglip")


# ------------------------------------------------------------------------------------ one variant, in a child
def samples(a, stage, model, tok, proc):
    """The stage's samples (dicts as data.VLMDataset returns them), their lengths and how long reading them took."""
    import torch
    from PIL import Image
    from data import IMAGE_TOKEN_INDEX, VLMDataset, image_inputs
    shape, n = SHAPES[a.shape], a.samples or SHAPES[a.shape]["samples"][stage]
    if shape["data"] == "demo":
        with open(os.path.join(ROOT, STAGES[stage]["data"])) as f:
            records = json.load(f)[:n]
        ds = VLMDataset(records, tok, proc, STAGES[stage]["template"], model.num_image_tokens, 2048,
                        os.path.join(ROOT, "demo/images"), max_tiles=model.max_tiles)
        t0 = time.perf_counter()
        items = [ds[i] for i in range(len(ds))]
        return items, ds.lengths, (time.perf_counter() - t0) / len(items)
    g, items, scale = torch.Generator().manual_seed(0), [], shape["tower"][4] / shape["full"][1][4]
    for (prompt, answer), (w, h) in zip(synthetic_lengths(a.shape, stage, n), PICTURES * n):
        noise = torch.randint(0, 256, (round(h * scale), round(w * scale), 3), dtype=torch.uint8, generator=g)
        views, grids, (k,) = image_inputs([Image.fromarray(noise.numpy())], proc, "square", model.max_tiles,
                                          model.num_image_tokens)   # untiled: [1, 3, H, W], None
        ids = torch.randint(0, len(tok), (k + prompt + answer,), generator=g)
        ids[:k] = IMAGE_TOKEN_INDEX   # the image first, as the original moves it to the front of its turn
        labels = torch.where(torch.arange(len(ids)) >= len(ids) - answer, ids, -100)   # the answer alone
        items.append({"input_ids": ids, "labels": labels, "pixel_values": views, "image_grids": grids})
    return items, [len(x["input_ids"]) for x in items], None


def original_batches(lengths, mb, seed, by_modality):
    """The original's sampler on one process: random order; with group_by_modality_length (its finetune) images
    and text-only samples apart, but no grouping by length (its megabatch is one batch)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    parts = [[i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n <= 0]] \
        if by_modality else [list(range(len(lengths)))]
    batches = []
    for part in parts:
        part = [part[i] for i in torch.randperm(len(part), generator=g).tolist()]
        batches += [part[i:i + mb] for i in range(0, len(part), mb)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def original_loss(model, b):
    """The original's forward on a batch: every row through the tower (a zero image where it has none), every
    position's logits over the whole vocabulary, their mean cross-entropy. (Same value as ours: tested.)"""
    import torch
    import torch.nn.functional as F
    from data import IMAGE_TOKEN_INDEX
    has = (b["input_ids"] == IMAGE_TOKEN_INDEX).any(1)
    full = torch.zeros(len(has), 3, *model.image_size, device=b["input_ids"].device, dtype=model.vision_tower.dtype)
    if b["images"] is not None:
        full[has] = b["images"].to(full.dtype)
    with torch.no_grad():   # frozen, and under reentrant checkpointing: no autograd
        feats = model.vision_tower(full)
    embeds = model.embed(b["input_ids"], image_features=model.connector(feats)[has])
    logits = model.language_model(inputs_embeds=embeds, attention_mask=b["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].contiguous().view(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))


def run_variant(a, stage, variant):
    """One variant of one stage in this process: warm-up, the timed steps; returns the measurements."""
    import torch
    from data import IMAGE_TOKEN_INDEX, collate, model_inputs
    from flops import TensorMemory, flop_profile, in_use, peak_since_reset, reset_peak, rss_mib, train_flops
    from model import ModelArgs, build_model
    from train import checkpoint_layers, grouped_batches
    torch.manual_seed(0)
    original, device = variant == "original", a.device
    __import__("model").FUSED_GELU = not original   # the original runs HF's gelu_new as it is written: eight ops
    tiles, ps = re.search(r"tiles(\d+)|$", variant)[1] or 0, re.search(r"ps(\d+)|$", variant)[1]   # ours+tilesN+psS
    # the original runs every tower layer and the post-norm: as costly as keeping all of them (layer -1)
    model, tok, proc = build_model(ModelArgs(llm=f"{a.root}/llm", vision_tower=f"{a.root}/siglip", dtype=a.dtype,
                                             vision_feature_layer=-1 if original else -2, max_tiles=int(tiles),
                                             connector=f"pixel_shuffle{ps}_mlp2x_gelu" if ps else "mlp2x_gelu",
                                             legacy_patch_drop=SHAPES[a.shape]["legacy_patch_drop"]))
    model.to(device)
    for name in ("language_model", "vision_tower", "connector"):
        getattr(model, name).requires_grad_(name in STAGES[stage]["trains"])
    items, lengths, read_s = samples(a, stage, model, tok, proc)
    batches = original_batches(lengths, a.micro_batch, 0, stage == "finetune") if original else \
        grouped_batches(lengths, a.micro_batch, seed=0)
    data = [collate([items[i] for i in b], tok.pad_token_id) for b in batches]
    if "cache" in variant:   # the tower's outputs, computed before timing, as a FeatureCache hands them over
        for b in data:
            with torch.no_grad():
                b["tower_features"] = None if b["images"] is None else model.vision_tower(b["images"].to(device))
            b["images"] = None
    if original or "ckpt" in variant:   # the original's scripts: --gradient_checkpointing True
        checkpoint_layers(model.language_model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=not original)   # as train.py; the original: HF Trainer's for-loop
    model.train()   # HF checkpointing only recomputes in train mode
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled="bf16" in variant)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def step(b, mark=lambda name: None):   # mark: the profile's clock at the end of each phase
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        with autocast:
            out = original_loss(model, b) if original else model(**model_inputs(b))
            loss = out if original else out["loss_sum"] / out["num_tokens"].clamp(min=1)
        mark("loss")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")

    with torch.no_grad():   # weights may still be file-mapped, paged in by the first step: page them in now
        sum(float(p.sum()) for p in model.parameters())
    dev = torch.device(device)
    process_peak, base = rss_mib("VmHWM"), in_use(dev)
    reset_peak(dev)   # the step's window: warm-up (the optimizer state appears) and the timed steps
    with TensorMemory() as tensors:   # the first step, untimed, on the longest batch: its tensors' peak
        step(max(data, key=lambda b: float(b["attention_mask"].sum())))
    for b in data[:a.warmup - 1]:
        step(b)
    sync()
    t0 = time.perf_counter()
    for b in data:
        step(b)
    sync()
    dt = time.perf_counter() - t0
    peak = peak_since_reset(dev)
    tokens, padded = sum(float(b["attention_mask"].sum()) for b in data), sum(b["attention_mask"].numel() for b in data)
    grids = [f"{r}x{c}" for b in data if b["image_grids"] is not None for r, c in b["image_grids"].tolist()]
    images = len(grids) or sum(b["n_images"] for b in data)   # untiled: one view each
    out = dict(samples_s=len(items) / dt, padding=1 - tokens / padded, seconds=dt, step_mib=tensors.peak / 2 ** 20,
               rss_step_mib=peak - base, proc_mib=max(process_peak, rss_mib("VmHWM")), tokens_s=tokens / dt,
               image_tokens=sum(int((b["input_ids"] == IMAGE_TOKEN_INDEX).sum()) for b in data) / max(1, images),
               grids={g: grids.count(g) for g in sorted(set(grids))})
    if not original:   # model FLOPs of the useful work: the original's rows take ours' (the same samples)
        profile = flop_profile(model, model.image_size)   # the tower and connector per view: n_images counts views
        parts = [train_flops(profile, b["attention_mask"], b["labels"], b["n_images"], "cache" not in variant,
                             parts=True) for b in data]
        out["flop_parts"] = {k: sum(p[k] for p in parts) for k in parts[0]}
        out["flops"] = sum(out["flop_parts"].values())
    if variant == "ours" and a.profile:
        out["profile"] = profile_step(model, step, data, items, batches, tok, read_s, sync)
    return out


def profile_step(model, step, data, items, batches, tok, read_s, sync, repeats=3):
    """Where a step's time goes (seconds, median of `repeats` runs of the longest batch): the tower, connector and
    decoder timed by forward hooks; the head from the decoder's end to the loss (its backward runs there too:
    LinearCrossEntropy forms its gradients in the forward); the backward (LLM and connector); the optimizer with
    clipping; "data": reading the batch's samples (decoding, preprocessing, tokenising) and collating them."""
    from data import collate
    now = lambda: (sync(), time.perf_counter())[1]  # noqa: E731
    marks, runs = {}, []
    for name, m in [("tower", model.vision_tower), ("connector", model.connector),   # hooks left on: the model is
                    ("LLM forward", model.language_model.get_decoder())]:               # thrown away after this
        m.register_forward_pre_hook(lambda m, a, name=name: marks.__setitem__(name + "<", now()))
        m.register_forward_hook(lambda m, a, o, name=name: marks.__setitem__(name + ">", now()))
    i = max(range(len(data)), key=lambda i: float(data[i]["attention_mask"].sum()))
    for _ in range(repeats):
        marks["start"] = now()   # the same batch each time: every mark is set again
        step(data[i], lambda name: marks.__setitem__(name, now()))
        t = {k: marks.get(k + ">", 0.0) - marks.get(k + "<", 0.0) for k in ("tower", "connector", "LLM forward")}
        for k, start, end in [("head (+ its backward)", "LLM forward>", "loss"), ("backward", "loss", "backward"),
                              ("optimizer", "backward", "optimizer"), ("step", "start", "optimizer")]:
            t[k] = marks[end] - marks[start]
        runs.append(t)
    out = {k: statistics.median(t[k] for t in runs) for k in runs[0]}
    if read_s is not None:   # synthetic samples cost nothing to make: no data time for them
        t0 = time.perf_counter()
        collate([items[j] for j in batches[i]], tok.pad_token_id)
        out["data"] = read_s * len(batches[i]) + time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------ the driver
HWM = "print('VmHWM', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)"


def python(*args, code=None):
    """`python script args` (or `python -c code`) that prints its own peak RSS at exit (a child's ru_maxrss also
    counts the parent's RSS at the fork, so the kernel's figure would be this process's)."""
    run = code or "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return [sys.executable, "-c", f"import atexit, runpy, sys; atexit.register(lambda: {HWM}); {run}", *args]


def command(cmd):
    """Run a command (from python()) to its end: (seconds, its peak RSS in MiB, its output)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)[-300:]} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return dt, int(out.stderr.rsplit("VmHWM ", 1)[1].split()[0]) / 1024, out.stdout


def spread(xs):
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]" if len(xs) > 1 else f"{xs[0]:.2f}"


def bench_shape(a, shape, peaks):
    """Every stage of a shape: the variants alternating over the rounds (each in a fresh process), then the table,
    the FLOP shares and the profile of our step. peaks: the matmul peaks measured so far (the best counts)."""
    from flops import matmul_peak
    report, spec = {}, dict(shape=shape, root=os.path.join(a.root, shape), device=a.device, dtype=a.dtype,
                            micro_batch=a.micro_batch, warmup=a.warmup, samples=a.samples)
    for stage in a.stages:
        runs = {v: [] for v in a.variants}
        for r in range(a.rounds):
            peaks.append(matmul_peak(getattr(__import__("torch"), a.dtype), a.device))
            for v in a.variants if r % 2 == 0 else a.variants[::-1]:
                child = dict(spec, stage=stage, variant=v, profile=v == "ours" and r == a.rounds - 1)
                runs[v].append(json.loads(command(python(__file__, "--_child", json.dumps(child)))[2].splitlines()[-1]))
        peak, base, ours = max(peaks), runs[a.variants[0]], runs["ours"]
        print(f"\n{shape} / {stage}: {a.samples or SHAPES[shape]['samples'][stage]} samples, micro-batch "
              f"{a.micro_batch}, {a.dtype}, {a.rounds} rounds, matmul peak {peak / 1e9:.0f} GFLOP/s; x 1st: to "
              f"{a.variants[0]}\n{'variant':<16}{'samples/s':>10}{'x 1st [range]':>19}{'tok/s':>7}{'img tok':>8}"
              f"{'tok/smp':>8}{'MFU':>7}{'padding':>8}{'step MiB':>9}{'x 1st':>6}{'RSS+ MiB':>9}{'proc MiB':>9}  grids")
        for v, xs in runs.items():
            med = lambda key, runs=xs: statistics.median(x[key] for x in runs)  # noqa: E731
            ratio = spread([x["samples_s"] / o["samples_s"] for x, o in zip(xs, base)])
            mfu = statistics.median(x.get("flops", ours[0]["flops"]) / x["seconds"] for x in xs) / (
                a.peak_bf16 if "bf16" in v else peak)   # each in its own dtype's peak
            print(f"{v:<16}{med('samples_s'):>10.2f}{ratio:>19}{med('tokens_s'):>7.0f}{med('image_tokens'):>8.1f}"
                  f"{med('tokens_s') / med('samples_s'):>8.1f}{100 * mfu:>6.1f}%{100 * med('padding'):>7.1f}%"
                  f"{med('step_mib'):>9.0f}{med('step_mib') / med('step_mib', base):>6.2f}{med('rss_step_mib'):>9.0f}"
                  f"{med('proc_mib'):>9.0f}  " + " ".join(f"{g}:{n}" for g, n in xs[0]["grids"].items()))
        share = {k: v / ours[-1]["flops"] for k, v in ours[-1]["flop_parts"].items()}
        print("model FLOPs of our step: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()))
        prof = ours[-1].get("profile")
        if prof:
            named = sum(v for k, v in prof.items() if k not in ("step", "data"))
            print("our step, its longest batch, ms: " + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in prof.items()) +
                  f" ({100 * named / prof['step']:.0f}% of the step named)" + "; data synthetic" * ("data" not in prof))
        report[stage] = {"runs": runs, "flop_shares": share, "profile": prof}
    return report


def chat_model(a):
    """The demo's trained model when demo.py has run, else a model of its kind (tiny_original's parts, random)."""
    demo = os.path.join(ROOT, "out/demo/2_finetune")
    if os.path.isfile(os.path.join(demo, "train_config.json")):
        return demo, "out/demo/2_finetune"
    out, base = os.path.join(a.root, "chat-model"), os.path.join(a.root, "tiny_original")
    if not os.path.isfile(os.path.join(out, "train_config.json")):
        from model import ModelArgs, build_model, save_pretrained
        make_base(base, "tiny_original")
        save_pretrained(*build_model(ModelArgs(llm=f"{base}/llm", vision_tower=f"{base}/siglip")), out)
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump({"template": "phi"}, f)
    return out, "tiny_original's parts, random weights (out/demo/2_finetune not built)"


def startup(a):
    """`--help` of every script, chat.py answering one question, and the imports under them: seconds and peak RSS,
    the commands alternating over the rounds."""
    with open(os.path.join(ROOT, "demo/pretrain.json")) as f:
        image = os.path.join(ROOT, "demo/images", json.load(f)[0]["image"])
    model_dir, which = chat_model(a)
    cmds = {f"{s} --help": python(s, "--help") for s in ("train.py", "bench.py", "chat.py", "evaluate.py",
                                                         "convert.py", "check_data.py", "demo.py")}
    cmds["chat.py, one 8-token answer"] = python("chat.py", "--model", model_dir, "--image", image, "--prompt",
                                                 "What digit is this?", "--max-new-tokens", "8", "--no-stream")
    for code in ("import torch", "from transformers import PreTrainedModel", "import model"):   # the floor under chat
        cmds[f"python -c '{code}'"] = python(code=code)
    res = {k: [] for k in cmds}
    for _ in range(a.rounds):
        for k, cmd in cmds.items():
            res[k].append(command(cmd)[:2])
    print(f"\nstart-up (median [lowest-highest] of {a.rounds}; chat model: {which})\n{'command':<54}{'seconds':>20}"
          f"{'peak RSS MiB':>14}  target")
    for k, xs in res.items():
        target = "2 s" if k.endswith("--help") else "5 s" if k.startswith("chat") else ""
        print(f"{k:<54}{spread([x[0] for x in xs]):>20}{statistics.median(x[1] for x in xs):>14.0f}  {target}")
    return res


def train_runs(a):
    """train.py end to end on tiny_original as a user runs it, a process per stage (pretrain on the 200 captions,
    then finetune from it on the 240 conversations; fp32, batch 8, no loader workers: every byte is in the measured
    process), checkpointing on (the original's setting) and auto (train.py's default); peak RSS from the kernel."""
    root = os.path.join(a.root, "tiny_original")
    make_base(root, "tiny_original")
    args = [f"--llm={root}/llm", f"--vision_tower={root}/siglip", "--legacy_patch_drop=true", "--bf16=false",
            "--micro_batch_size=8", "--global_batch_size=8", "--num_workers=0", "--log_every=1000", "--overwrite"]
    for stage, n in SHAPES["tiny_original"]["samples"].items():
        with open(os.path.join(ROOT, STAGES[stage]["data"])) as f:
            records = json.load(f)[:n]
        with open(os.path.join(root, f"{stage}{n}.json"), "w") as f:
            json.dump(records, f)
        args += [f"--data_{stage}={root}/{stage}{n}.json", f"--images_{stage}={ROOT}/demo/images"]
    stage_args = {"pretrain": "--stages=[{'name': 'pretrain', 'template': 'pretrain', 'tune_llm': 'frozen', "
                              "'tune_vision_tower': 'frozen', 'tune_connector': 'full', 'lr': 1e-3}]",
                  "finetune": "--stages=[{'name': 'finetune', 'template': 'phi', 'tune_llm': 'full', "
                              "'tune_vision_tower': 'frozen'}]"}
    results = {}
    for r in range(a.rounds):
        for ckpt in ("true", "auto") if r % 2 == 0 else ("auto", "true"):
            for stage in ("pretrain", "finetune"):   # finetune starts from this round's pretrained model
                init = [f"--init_from={root}/run/{r}_{ckpt}_pretrain/1_pretrain"] * (stage == "finetune")
                _, mib, text = command(python("train.py", *args, stage_args[stage], *init,
                                              f"--out_dir={root}/run/{r}_{ckpt}_{stage}", f"--gradient_checkpointing={ckpt}"))
                sps = float(text.rsplit(" samples/s", 1)[0].rsplit("| ", 1)[1])
                results.setdefault(f"{stage}, checkpointing {ckpt}", []).append((sps, mib))
    # absolute numbers only: the original's code does not run here, and a ratio to a number measured on another
    # machine would divide two machines (README, issue #25)
    print(f"\ntrain.py on tiny_original, whole runs, {a.rounds} rounds alternating\n"
          f"{'run':<30}{'samples/s':>20}{'peak RSS MiB':>24}")
    for k, xs in results.items():
        print(f"{k:<30}{spread([x[0] for x in xs]):>20}{spread([x[1] for x in xs]):>24}")
    return results


def eval_and_loss(a):
    """Issue #7's two: greedy answers through evaluate.answer at batch 1 and 16 (head_heavy's parts, a spread-out
    connector, 32 demo questions); the LM-head loss at a 256k vocabulary, logits at once against chunked."""
    import tempfile
    import torch
    import torch.nn.functional as F
    import evaluate
    from flops import TensorMemory
    from model import LOSS_CHUNK, LinearCrossEntropy, ModelArgs, build_model
    root, out = os.path.join(a.root, "head_heavy"), {}
    make_base(root, "head_heavy")
    torch.manual_seed(0)
    model, tok, proc = build_model(ModelArgs(llm=f"{root}/llm", vision_tower=f"{root}/siglip"))
    for p in model.to(a.device).connector.parameters():
        p.data.normal_(0, 0.5)
    items = evaluate.load_questions("vqav2", os.path.join(ROOT, "demo/eval/vqav2/llava_vqav2_demo_val.jsonl"))[:32]
    print(f"\nevaluate.answer, {len(items)} questions, fastest of {a.rounds} rounds\n{'new tokens':<12}"
          f"{'batch 1 samples/s':>19}{'batch 16 samples/s':>20}{'ratio':>7}  answers")
    with tempfile.TemporaryDirectory() as tmp:
        for new in (1, 8, 64):
            for bs in (1, 16):
                runs = []
                for r in range(a.rounds + 1):   # the first warms up
                    t0 = time.perf_counter()
                    rows = evaluate.answer(model, tok, proc, items, os.path.join(ROOT, "demo/images"), "phi",
                                           f"{tmp}/{bs}_{new}_{r}.jsonl", bs, new, min_new_tokens=new)
                    runs.append((time.perf_counter() - t0, [x["text"] for x in rows]))
                out[f"{new} tokens, batch {bs}"] = (len(items) / min(dt for dt, _ in runs[1:]), runs[-1][1])
            (one, ans1), (many, ans16) = out[f"{new} tokens, batch 1"], out[f"{new} tokens, batch 16"]
            print(f"{new:<12}{one:>19.2f}{many:>20.2f}{many / one:>7.2f}  {'identical' if ans1 == ans16 else 'DIFFER'}")
    g = torch.Generator().manual_seed(0)
    w, h, targets = torch.randn(256000, 256, generator=g), torch.randn(1024, 256), torch.randint(0, 256000, (1024,))
    for name in ("logits at once", "chunked"):
        wg, hg, t0 = w.clone().requires_grad_(), h.clone().requires_grad_(), time.perf_counter()
        with TensorMemory() as mem:
            (LinearCrossEntropy.apply(hg, wg, None, targets, None, LOSS_CHUNK // 256000, True) if name == "chunked"
             else F.cross_entropy(F.linear(hg, wg), targets, reduction="sum")).backward()
        out[name] = (time.perf_counter() - t0, mem.peak / 2 ** 20)
        print(f"LM-head loss, 1,024 tokens x 256k vocabulary, {name}: {out[name][0]:.2f} s, {out[name][1]:.0f} MiB")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(REPRESENTATIVE), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--stages", default="pretrain,finetune")
    p.add_argument("--variants", default="original,ours,ours+ckpt", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--only", default="train,startup", help=f"comma-separated, of {', '.join(PARTS)} (train: the shapes)")
    p.add_argument("--rounds", type=int, default=3, help="alternating repetitions of every measurement")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (the first, on the longest batch, measures memory)")
    p.add_argument("--samples", type=int, default=0, help="samples per stage (0: the shape's own)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if there is one)")
    p.add_argument("--dtype", default="float32", help="weights: float32 | bfloat16 (ours+bf16 autocasts fp32 ones)")
    p.add_argument("--root", default=os.path.join(ROOT, "out", "bench"), help="the shapes' models, one folder each")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)   # --help ends here, before torch loads
    for key, valid in [("shapes", SHAPES), ("stages", STAGES), ("variants", VARIANTS), ("only", PARTS)]:
        if set(getattr(a, key).split(",")) - set(valid):   # a mistyped name: one line, before torch loads
            p.error(f"--{key} {getattr(a, key)}: each must be one of {', '.join(valid)}")
    if a._child:   # one measurement; JSON on the last stdout line
        a = argparse.Namespace(**json.loads(a._child))
        return print(json.dumps(run_variant(a, a.stage, a.variant)))
    import torch
    from flops import matmul_peak
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.stages, a.variants, only = a.stages.split(","), a.variants.split(","), a.only.split(",")
    peaks = {d: matmul_peak(getattr(torch, d), a.device) for d in ("float32", "bfloat16")}
    a.peak_bf16 = peaks["bfloat16"]
    if "ours+bf16" in a.variants and a.device == "cpu" and peaks["bfloat16"] <= peaks["float32"]:
        print(f"ours+bf16 left out: bf16 matmuls ({peaks['bfloat16'] / 1e9:.0f} GFLOP/s) are no faster than fp32 here")
        a.variants.remove("ours+bf16")
    print(f"{a.device}: {__import__('flops').machine_name(torch.device(a.device))}, {torch.get_num_threads()} threads; "
          "matmul peak " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    report = {"device": a.device, "dtype": a.dtype, "peak_flops": peaks}
    for shape in a.shapes.split(",") if "train" in only else []:
        make_base(os.path.join(a.root, shape), shape)
        report[shape] = bench_shape(a, shape, [peaks[a.dtype]])
    for part, measure in [("startup", startup), ("run", train_runs), ("eval", eval_and_loss)]:
        report.update({part: measure(a)} if part in only else {})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

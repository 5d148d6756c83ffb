"""
Train a TinyLLaVA-style model: an explicit Accelerate loop over the stages of a recipe.

    python demo.py                                                        # the embedded CPU demo (tiny models)
    accelerate launch train.py --config configs/phi2_siglip_base.py       # 1 GPU
    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/phi2_siglip_base.py
    accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/phi2_siglip_base.py
    ... --lr=1e-4 --bf16=false --finetune.lr=1e-4 --resume
CPU processes (gloo): ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
    --mixed_precision no --dynamo_backend no train.py --config ...   (plain `--cpu --num_processes 2` starts ONE process)

Config (recipes.py): DEFAULTS, then the --config file (Python assigning some of those names; it runs as code),
then --key=value. A recipe is a list of stages; each stage overrides a few keys (tune types, lr, batch, template,
data) and starts from the previous stage's saved model; `--<stage>.<key>=value` overrides one stage's value.
A stage trains in out_dir/<n>_<stage>.partial/, keeping resumable checkpoints in its checkpoints/step_N (model,
optimizer, scheduler, RNG, step, data position, losses); at the end the model is written there (a self-contained
folder, see model.save_pretrained) and the folder is renamed to out_dir/<n>_<stage>/ in one step: a stage folder
exists only when complete. An out_dir that holds a run is resumed (--resume), replaced (--overwrite) or refused.
"""
import contextlib
import json
import math
import os
import shutil
import sys
from functools import partial

from checkpoints import (check_finite, check_resume, finished, latest_checkpoint, one_rank_decides,  # noqa: F401
                         plan_output, read_trainer_state, release_lock, save_checkpoint, stage_record, RUN)
from recipes import (DEFAULTS, ConfigError, check_settings, cosine_with_warmup, load_config,  # noqa: F401
                     param_groups, stage_configs)
from run_log import METRICS, StepLog, log_line, plot_losses, quiet_third_party, tracked, tracker_names
from settings import say


# ----------------------------------------------------------------------------- data order
def grouped_batches(lengths, batch_size, seed, group_by_length=True, world=1):
    """Batches of indices for one epoch, deterministic in `seed`, laid out for `world` ranks: Accelerate hands
    batch i to rank i % world, so each run of `world` consecutive batches is one global micro-batch. With
    grouping, image and text-only samples never share a global micro-batch (as the original's modality
    grouping; under ZeRO-3 a rank that skips the tower while another runs it would hang), and within shuffled
    megabatches samples are sorted by length so a batch pads little. A short last global batch is topped up
    with its own samples so every rank gets one (at most world - 1 repeats per modality and epoch)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    parts = [torch.nonzero(lengths > 0).flatten(), torch.nonzero(lengths <= 0).flatten()] if group_by_length \
        else [torch.arange(len(lengths))]
    size, global_batches = batch_size * world, []
    for part in parts:
        part = part[torch.randperm(len(part), generator=g)]
        for mega in part.split(size * 64 if group_by_length else size):
            if group_by_length:
                mega = mega[torch.argsort(lengths[mega].abs(), descending=True, stable=True)]
            global_batches += list(mega.tolist()[i:i + size] for i in range(0, len(mega), size))
    out = []
    for i in torch.randperm(len(global_batches), generator=g).tolist() if group_by_length else range(len(global_batches)):
        gb = global_batches[i]
        gb = gb + gb[:max(0, world - len(gb))]
        k = -(-len(gb) // world)   # ceil: rank r takes gb[r*k:(r+1)*k]
        out += [gb[r * k:(r + 1) * k] or gb[-1:] for r in range(world)]
    return out


def report_skipped(dataset, work_dir, main):
    """bad_samples="skip": every record left out by any rank, as logged when met (skipped.rank<r>.jsonl: a crash
    loses none; a resumed stage keeps its earlier ones), counted and written to skipped.json."""
    import glob
    from data import read_skip_log
    rows = read_skip_log(*sorted(glob.glob(os.path.join(work_dir, "skipped.rank*.jsonl"))))
    if main and rows:
        with open(os.path.join(work_dir, "skipped.json"), "w") as f:
            json.dump(rows, f, indent=1)
        n_load = sum(r["when"] == "load" for r in rows)
        print(f"{len(rows)} records of {dataset.source} skipped ({n_load} when loading, {len(rows) - n_load} when "
              f"read: unreadable images, answers truncated away); see {work_dir.removesuffix('.partial')}/skipped.json")


def final_state(accelerator, model, raw):
    """The whole model's weights for the final save. Sharded runs (DeepSpeed, FSDP): Accelerate gathers the shards,
    a collective every rank joins. Others: the model's own state dict, which is what Accelerate would return, but
    its get_state_dict imports DeepSpeed wherever it is installed just to unwrap the model (18 MB, 0.3 s)."""
    if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        return accelerator.get_state_dict(model)
    return raw.state_dict()


def checkpoint_layers(llm):
    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    llm.enable_input_require_grads()   # checkpointing through a frozen embedding


def checkpointing_needed(accelerator, model, dataset, collate_fn, mb, trainable):
    """gradient_checkpointing="auto": one forward and backward of the stage's longest micro-batch without
    checkpointing (the RNG untouched, its gradients dropped), its peak memory measured (GPU: allocated; CPU: its live
    tensors, flops.TensorMemory, which leaves the process's peak-RSS record alone). Checkpointing goes on when that
    peak, plus the optimizer state still to come (two values per trained weight), with a quarter to spare, would not
    fit in the memory free on the device (a CPU's: shared by its processes). Any rank's "no room" turns it on for
    all. Returns (on, why)."""
    import torch
    from data import DataError, model_inputs
    from flops import TensorMemory, free_mib
    device, batch = accelerator.device, []
    for i in sorted(range(len(dataset)), key=lambda i: -abs(dataset.lengths[i])):
        try:
            batch.append(dataset.sample(i))   # not dataset[i]: a bad record is logged once, by the loop
        except DataError:
            continue
        if len(batch) == mb:
            break
    need, cuda = math.inf, device.type == "cuda"
    if batch:
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_fn(batch).items()}
        before = torch.cuda.memory_allocated(device) if cuda else 0
        torch.cuda.reset_peak_memory_stats(device) if cuda else None
        try:
            with torch.random.fork_rng(devices=[device] if cuda else []), \
                    contextlib.nullcontext() if cuda else TensorMemory() as tensors:
                with accelerator.autocast():
                    out = model(**model_inputs(b))
                accelerator.backward(out["loss_sum"] / out["num_tokens"].clamp(min=1))
                del out
            peak = torch.cuda.max_memory_allocated(device) - before if cuda else tensors.peak
            need = 1.25 * (peak + sum(2 * p.numel() * p.element_size() for p in trainable)) / 2 ** 20
        except torch.OutOfMemoryError:
            pass
        model.zero_grad(set_to_none=True)
        del b
    free = free_mib(device) / (1 if cuda else accelerator.num_processes)
    on = bool(accelerator.reduce(torch.tensor(float(need > free), device=device), "sum") > 0)
    why = f"{need:.0f} MiB with a quarter to spare" if math.isfinite(need) else "no step could be measured"
    return on, f"a step of the {len(batch)} longest samples without it: {why}; {free:.0f} MiB free"


@contextlib.contextmanager
def gathered(module):
    """ZeRO-3 partitions weights at load: whole for the duration of the block (a no-op otherwise)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params):
        yield


# ----------------------------------------------------------------------------- one stage
def train_stage(cfg, accelerator, init, stage_dir):
    """Train one stage in stage_dir + ".partial" and rename that to stage_dir when the model is saved."""
    import torch
    from accelerate.utils import DistributedType
    from torch.utils.data import DataLoader
    from data import VLMDataset, collate, model_inputs, record_images, token_count
    from flops import fastest_threads, flop_profile, machine_name, measured, process_peak, train_flops
    from model import FeatureCache, ModelArgs, build_model, load_pretrained, set_tiling   # load: every layout
    from recipes import apply_recipe, quantization_kwargs

    torch.manual_seed(cfg["seed"])
    main = accelerator.is_main_process
    ds = accelerator.state.deepspeed_plugin
    lora = any(cfg[f"tune_{c}"] in ("lora", "qlora") for c in ("llm", "vision_tower", "connector"))
    if lora and (accelerator.distributed_type == DistributedType.FSDP or ds is not None and ds.zero_stage == 3):
        # final_save merges the adapters on the main process, whose model holds only its shard there
        raise ValueError(f"stage {cfg['stage']!r}: LoRA / QLoRA stages run under DDP or ZeRO-2 "
                         "(configs/accelerate/zero2.yaml, the original's setting), not ZeRO-3 or FSDP")
    margs = ModelArgs(**{k: cfg[k] for k in ModelArgs.__dataclass_fields__})
    llm_kwargs = quantization_kwargs(cfg)
    if init:
        model, tokenizer, processor = load_pretrained(init, llm_kwargs=llm_kwargs,
                                                      trust_remote_code=cfg["trust_remote_code"])
        set_tiling(model, cfg["max_tiles"])   # 0 keeps the model's
    else:
        model, tokenizer, processor = build_model(margs, llm_kwargs=llm_kwargs)
    work_dir = stage_dir + ".partial"
    if main and os.path.isdir(work_dir) and not latest_checkpoint(work_dir):
        shutil.rmtree(work_dir)   # a run that stopped before its first checkpoint: nothing in it to keep
    accelerator.wait_for_everyone()   # before any rank logs a skipped record into it
    if main:
        print(f"\n=== stage {cfg['stage']}: from {init or 'pretrained parts'} -> {stage_dir}")
    apply_recipe(model, cfg, verbose=main)
    if cfg["gradient_checkpointing"] is True:
        checkpoint_layers(model.language_model)

    data, images = cfg[f"data_{cfg['data']}"], cfg[f"images_{cfg['data']}"]   # checked by check_settings
    if main:   # into every checkpoint: --resume refuses a data file changed since (checkpoints.check_data_files)
        from checkpoints import fingerprint
        cfg["data_files"] = {f"data_{cfg['data']}": fingerprint(data)}
    dataset = VLMDataset(data, tokenizer, processor, cfg["template"], model.num_image_tokens, cfg["max_length"],
                         images or None, cfg["image_aspect_ratio"], cfg["bad_samples"],
                         allow_outside_images=cfg["allow_outside_images"], max_images=cfg["max_images"],
                         max_tiles=model.max_tiles,
                         skip_log=os.path.join(work_dir, f"skipped.rank{accelerator.process_index}.jsonl"))
    world, mb, device = accelerator.num_processes, cfg["micro_batch_size"], accelerator.device
    with accelerator.local_main_process_first():   # one process per machine measures, the others read its cache
        if device.type == "cpu":
            width, rows = model.language_model.get_input_embeddings().embedding_dim, mb * min(cfg["max_length"], 512)
            torch.set_num_threads(cfg["threads"] or measured(f"threads|{machine_name(device)}|{width}x{rows}",
                                                             partial(fastest_threads, width, rows)))
        if not cfg["peak_flops"]:   # the MFU's denominator / processes: this process's share of the machine's peak
            dtype = torch.bfloat16 if cfg["bf16"] else torch.float16 if cfg["fp16"] else torch.float32
            cfg["peak_flops"] = process_peak(dtype, device, torch.get_num_threads(),
                                             int(os.environ.get("LOCAL_WORLD_SIZE") or world))
    if main:
        print(f"{torch.get_num_threads()} threads, " * (device.type == "cpu") + f"peak {cfg['peak_flops'] / 1e9:.0f} "
              "GFLOP/s" + f" per process x {world} processes" * (world > 1))
    with gathered(model.vision_tower), gathered(model.connector):   # ZeRO-3 may have partitioned them at load
        model.vision_tower.to(accelerator.device)
        model.connector.to(accelerator.device)
        flops_of = flop_profile(model, model.image_size)   # for the MFU in the log
        if cfg["feature_cache"] and not any(p.requires_grad for p in model.vision_tower.parameters()):
            dataset.feature_cache = FeatureCache(cfg["feature_cache"], model, processor)
            done, failed = dataset.feature_cache.fill(model, [x for r in dataset.records for x in record_images(r)],
                                                      images, 4 * mb, accelerator.process_index, world)
            if main:
                print(f"feature cache {dataset.feature_cache.dir}: {done} images computed here ({failed} unreadable)")
    accelerator.wait_for_everyone()
    if cfg["compile"]:   # in place: the state-dict keys stay as they are
        model.language_model.get_decoder().compile()
    accum = cfg["global_batch_size"] // (mb * world)
    if accum < 1 or accum * mb * world != cfg["global_batch_size"]:
        raise ValueError(f"global_batch_size {cfg['global_batch_size']} is not micro_batch_size {mb} x "
                         f"{world} processes x an integer number of accumulation steps")
    accelerator.gradient_state.plugin_kwargs.update(num_steps=accum, sync_with_dataloader=False)   # docs/training.md
    collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)

    def loader(epoch):   # each rank takes every world-th batch of the same seeded order
        batches = grouped_batches(dataset.lengths, mb, cfg["seed"] + epoch, cfg["group_by_length"], world)
        # its own generator: starting an iterator draws a worker seed, which must not come from the global RNG
        # that dropout uses (a resumed run restores that RNG, then starts an iterator the original run did not)
        return accelerator.prepare_data_loader(DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                                                          num_workers=cfg["num_workers"],
                                                          generator=torch.Generator().manual_seed(cfg["seed"])))

    steps_per_epoch = len(loader(0)) // accum
    total = cfg["max_steps"] or steps_per_epoch * cfg["epochs"]
    if steps_per_epoch == 0:
        raise ConfigError(f"{data}: {len(dataset)} samples make less than one global batch of {cfg['global_batch_size']}")
    # fused: one kernel over each parameter (torch's CPU and CUDA AdamW): 3.5x the for-loop's speed on a CPU, equal
    # within float rounding; not under DeepSpeed / FSDP, whose sharded parameters it may not take
    fused = accelerator.distributed_type.value not in ("DEEPSPEED", "FSDP") and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999), fused=fused)
    warmup = math.ceil(cfg["warmup_ratio"] * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(cosine_with_warmup, warmup=warmup, total=total))
    if ds is not None:   # DeepSpeed owns accumulation and clipping: give it this stage's numbers, not "auto"
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=accum,
                                   train_batch_size=mb * accum * world, gradient_clipping=cfg["grad_clip"])
    # the model itself, under whatever wrapper prepare puts around it (accelerator.unwrap_model would be the same
    # object, but it imports DeepSpeed wherever DeepSpeed is installed: 0.3 s and 20 MB a run without it does not use)
    raw = model
    model, optimizer = accelerator.prepare(model, optimizer)   # the scheduler is ours: stepped once per step
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()   # from_pretrained leaves the LLM in eval mode: no dropout, and HF checkpointing stays off
    if cfg["gradient_checkpointing"] == "auto":   # decided from a measured step, before a resume restores the RNG
        on, why = (False, "DeepSpeed's backward steps its optimizer, so no step is measured; set true for it") \
            if ds is not None else checkpointing_needed(accelerator, model, dataset, collate_fn, mb, trainable)
        if on:
            checkpoint_layers(raw.language_model)
        if main:
            print(f"gradient checkpointing {'on' if on else 'off'} (auto: {why})")

    step, history = 0, []   # history: the losses before this run's first step (a resumed stage's)
    ckpt = latest_checkpoint(work_dir) if cfg["resume"] else None
    if ckpt:   # plan_output has checked its record, settings and RNG state
        state = read_trainer_state(ckpt)
        step, history = state["step"], state.get("losses", [])
        if step > total:
            raise ConfigError(f"{ckpt}: step {step} is beyond this stage's {total} steps")
        new_lrs = list(scheduler.base_lrs)
        accelerator.load_state(ckpt)
        scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=True))
        changed = check_resume(state["config"], cfg, ckpt, state.get("processes"), world)
        if changed and main:
            print(f"--resume_allow: changed since {ckpt}: " + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if scheduler.base_lrs != new_lrs:   # a new lr (allowed above) takes effect from the resumed step on
            scheduler.base_lrs = new_lrs
            for g, lr in zip(optimizer.param_groups, new_lrs):
                g["initial_lr"], g["lr"] = lr, lr * cosine_with_warmup(step, warmup, total)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if main:
            print(f"resumed from {ckpt} at step {step}")
    elif cfg["resume"] and main:
        print(f"--resume: no checkpoint in {work_dir}; stage {cfg['stage']} starts at step 0")
    if main:
        print(f"{len(dataset)} samples, {steps_per_epoch} steps/epoch, {total} steps; global batch "
              f"{cfg['global_batch_size']} = {mb} x {world} processes x {accum} accumulation; "
              + token_count(raw.num_image_tokens, raw.max_tiles))

    val_loader = None
    if cfg["data_val"] and cfg["val_every"]:
        val_set = VLMDataset(cfg["data_val"], tokenizer, processor, cfg["template"], raw.num_image_tokens, cfg[
            "max_length"], cfg["images_val"] or None, cfg["image_aspect_ratio"], max_tiles=raw.max_tiles)
        val_loader = accelerator.prepare_data_loader(DataLoader(val_set, batch_size=mb, collate_fn=collate_fn,
                                                                generator=torch.Generator()))

    losses, bad_in_row = [], 0
    log = StepLog(os.path.join(work_dir, METRICS) if main else None, world, cfg["peak_flops"])
    if ckpt:
        log.resume(step)   # metrics.jsonl: the rows after the checkpoint go, the totals run on
    log.start()
    from tqdm.auto import tqdm   # on a terminal: a bar with epoch, loss, samples/s and ETA; the log lines go above it
    bar = tqdm(total=total, initial=step, desc=cfg["stage"], unit="step", disable=not (main and sys.stderr.isatty()))
    say = partial(print, flush=True) if bar.disable else bar.write
    first_bad = None   # the first step of the current run of non-finite steps
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        it = iter(accelerator.skip_first_batches(loader(epoch), done_in_epoch * accum))
        for _ in range(steps_per_epoch - done_in_epoch):
            micro, accelerator.step = [next(it) for _ in range(accum)], 0   # sync (DeepSpeed: step) at the last
            # Normalise by the supervised tokens of the whole optimizer step, across micro-batches and ranks:
            # accelerator.backward divides by `accum` and DDP averages over ranks, hence the * accum * world.
            local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            n_step = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
            step_loss, work = 0.0, [0.0, 0.0, 0.0]   # this rank's loss sum; its samples, tokens and model FLOPs
            for b in micro:
                with accelerator.accumulate(model), accelerator.autocast():
                    out = model(**model_inputs(b))
                    accelerator.backward(out["loss_sum"] * accum * world / max(n_step, 1))
                step_loss += float(out["loss_sum"].detach())
                work = [work[0] + b["input_ids"].shape[0], work[1] + int(b["attention_mask"].sum()), work[2] + train_flops(
                    flops_of, b["attention_mask"], b["labels"], b["n_images"], dataset.feature_cache is None)]
            # the norm is measured even without clipping (max_norm inf): a non-finite one skips the step
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg["grad_clip"] or math.inf)
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0   # DeepSpeed may not report one
            # one reduce: the loss, and the samples, tokens and model FLOPs of the whole job for the throughput
            loss, *job = accelerator.reduce(torch.tensor([step_loss, *work], device=device), "sum").tolist()
            loss /= max(n_step, 1)
            log.add(*job)
            bad_in_row = bad_in_row + 1 if not (math.isfinite(loss) and math.isfinite(grad_norm)) else 0
            first_bad = None if not bad_in_row else first_bad or step + 1
            if not bad_in_row:
                optimizer.step()   # (DeepSpeed has already stepped inside backward: see the README)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            lr, tag = scheduler.get_last_lr()[0], cfg["stage"]
            row = log.row(step, steps_per_epoch, loss, lr, grad_norm)
            bar.update(1)
            bar.set_postfix_str(f"epoch {row['epoch']:.2f}, loss {loss:.4f}, {row['samples_per_s']:.1f} samples/s",
                                refresh=False)
            if bad_in_row and main:
                say(f"step {step}: loss {loss} / gradient norm {grad_norm} not finite: step skipped ({bad_in_row} in a "
                    f"row, the limit is {cfg['max_nonfinite_steps']})")
            if bad_in_row >= cfg["max_nonfinite_steps"]:
                raise RuntimeError(f"stage {cfg['stage']}: {bad_in_row} steps in a row with a non-finite loss or "
                                   f"gradient norm (steps {first_bad}-{step}); stopping. The last checkpoint before "
                                   f"step {first_bad}: {latest_checkpoint(work_dir, before=first_bad)} (lower lr, check "
                                   "the data, or --bf16=false; then --resume --resume_allow=lr)")
            # not inside a run of non-finite steps: its checkpoints would push out the last good one
            save = cfg["save_every"] and step % cfg["save_every"] == 0 and step < total and not bad_in_row
            if main and (step % cfg["log_every"] == 0 or step == total):
                say(log_line(row, total))
                accelerator.log(tracked(row, tag), step=cfg["step0"] + step)
            if main and (step % cfg["log_every"] == 0 or step == total or save):   # a checkpoint's totals resume
                log.write(row)
            if val_loader is not None and step % cfg["val_every"] == 0:
                val = validate(model, val_loader, accelerator, cfg["val_batches"])
                if main:
                    say(f"step {step} | val loss {val:.4f}")
                    log.write(log.val_row(step, val))
                accelerator.log({f"{tag}/val_loss": val}, step=cfg["step0"] + step)
            if save:
                save_checkpoint(accelerator, work_dir, step, cfg, scheduler, trainable, history + losses)
            if step >= total:
                break

    bar.close()
    accelerator.wait_for_everyone()
    report_skipped(dataset, work_dir, main)
    check_finite(accelerator, trainable, f"the final save of stage {cfg['stage']}")
    state = final_state(accelerator, model, raw)
    if main:   # everything into the working folder, train_config.json last, then one rename
        os.makedirs(work_dir, exist_ok=True)
        with open(os.path.join(work_dir, "losses.json"), "w") as f:
            json.dump(history + losses, f)
        plot_losses(history + losses, os.path.join(work_dir, "loss.png"), f"stage {cfg['stage']}")
        final_save(raw, tokenizer, processor, work_dir, cfg, state, init)
        for name in os.listdir(work_dir):   # a temp file an interrupted earlier save left: never in a finished folder
            if name.endswith(".tmp") and os.path.isfile(os.path.join(work_dir, name)):
                os.remove(os.path.join(work_dir, name))
        os.replace(work_dir, stage_dir)
        if not cfg["keep_checkpoints"]:   # after the rename: a crash before it still has them to resume from
            shutil.rmtree(os.path.join(stage_dir, "checkpoints"), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return losses


def validate(model, val_loader, accelerator, max_batches):
    import torch
    from data import model_inputs
    model.eval()
    total, n = 0.0, 0
    for i, b in enumerate(val_loader):
        if i >= max_batches:
            break
        with torch.no_grad(), accelerator.autocast():
            out = model(**model_inputs(b))
        total += float(accelerator.reduce(out["loss_sum"].detach(), "sum"))
        n += int(accelerator.reduce(out["num_tokens"].detach(), "sum"))
    model.train()
    return total / max(n, 1)


def final_save(model, tokenizer, processor, stage_dir, cfg, state, init):
    """The stage's model, self-contained; LoRA stages also write PEFT adapter folders and save merged."""
    from model import save_pretrained
    from recipes import merge_adapters
    merged, merged_state = merge_adapters(model, stage_dir, cfg, init)
    if merged is not None:   # None: QLoRA without a previous stage, adapters only
        save_pretrained(merged, tokenizer, processor, stage_dir, template=cfg["template"],
                        state_dict=state if merged_state is None else merged_state)
    with open(os.path.join(stage_dir, "train_config.json"), "w") as f:   # last: marks the folder complete
        json.dump(cfg, f, indent=1, default=str)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):   # answered before torch loads: no package beyond the standard library
        return say(usage())
    cfg = load_config(argv)
    scfgs = stage_configs(cfg)
    check_settings(scfgs, int(os.environ.get("WORLD_SIZE", "1")))   # all of it, before torch loads (seconds)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs
    from transformers.utils import logging as hf_logging
    stage_dirs = [os.path.join(cfg["out_dir"], f"{i + 1}_{s['stage']}") for i, s in enumerate(scfgs)]
    if cfg["fp16"] and not torch.cuda.is_available():
        raise ConfigError("fp16 needs a GPU (fp16 matmul on CPU runs at ~1 GFLOP/s); use --bf16=true")
    hf_logging.set_verbosity_error(), hf_logging.disable_progress_bar()   # no "Loading weights" bar per load
    quiet_third_party()   # harmless messages of other packages (run_log.py says which, and why)
    precision = "bf16" if cfg["bf16"] else "fp16" if cfg["fp16"] else "no"
    # CPU processes talk over gloo; without naming it, Accelerate+DeepSpeed see 1 process on every rank
    gloo = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=precision, log_with=tracker_names(cfg["tracker"]) or None,
                              project_dir=cfg["out_dir"],
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if gloo else [])
    # Launches whose processes would each train alone, without a word (cpu_feasibility.md §1, §3): --multi_gpu with
    # no GPU and no ACCELERATE_USE_CPU=1 (DistributedType.NO), and FSDP, which Accelerate enables on GPUs only
    kind, several = accelerator.distributed_type, int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and kind == DistributedType.NO:
        raise RuntimeError("several processes were launched but Accelerate set up no distributed training: each would "
                           "train alone. Without GPUs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...")
    if several and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP:
        raise RuntimeError(f"an FSDP launch, but Accelerate set up {kind}: FSDP runs on GPUs only")
    RUN.update(stage_dirs=stage_dirs, argv=argv)   # for the line an interrupted run ends with
    plan_output(cfg, scfgs, stage_dirs, accelerator, argv)   # locks out_dir (checkpoints.RunLock) until the end
    try:
        if cfg["tracker"]:   # installed (check_settings); one that fails to start stops the run here, in a line
            try:
                accelerator.init_trackers("tinyllava-nano", config={k: str(v) for k, v in cfg.items()})
            except Exception as e:   # noqa: BLE001 -- whatever its package raises: the run would go untracked
                raise ConfigError(f"--tracker={cfg['tracker']}: could not start: {type(e).__name__}: {e}") from e
        todo = [i for i, d in enumerate(stage_dirs) if not finished(d)]
        if todo and cfg["check_data_at_start"]:   # every stage's data, before the first one trains
            from stage_check import check_stages
            start = stage_dirs[todo[0] - 1] if todo[0] else cfg["init_from"]   # what the first one starts from
            one_rank_decides(accelerator, lambda: check_stages([scfgs[i] for i in todo], start), timeout=24 * 3600)
        init, results, step0 = cfg["init_from"], {}, 0
        for scfg, stage_dir in zip(scfgs, stage_dirs):
            scfg["step0"] = step0   # the tracker's step count runs on across stages
            if finished(stage_dir):   # only with --resume: plan_output refused or deleted it otherwise
                if accelerator.is_main_process:
                    print(f"stage {scfg['stage']} already finished in {stage_dir}; skipping")
            else:
                results[scfg["stage"]] = train_stage(scfg, accelerator, init, stage_dir)
            init = stage_dir
            step0 += len(stage_record(stage_dir)[1])
        accelerator.end_training()
    finally:
        release_lock()
    return init, results


def usage():
    """This docstring and the DEFAULTS block of recipes.py, comments included: every key and its allowed values."""
    import recipes
    with open(recipes.__file__) as f:
        src = f.read()
    return __doc__ + "\nEvery key (--key=value or --key value; --<stage>.<key> for one stage):\n\n" + \
        src[src.index("DEFAULTS = dict("):src.index("\n)\n", src.index("DEFAULTS = dict(")) + 2]


if __name__ == "__main__":
    from records import DataError   # (no torch)
    try:
        main()
    except ConfigError as e:   # a mistake in the command or config: each problem on a line, no traceback
        print("\n".join(f"train.py: error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    except DataError as e:   # bad_samples=error met a bad record: that one line (from a loader worker: its last)
        line = str(e).strip().splitlines()[-1]
        print(f"train.py: error: {line.split('DataError: ', 1)[-1]}; bad_samples=skip leaves such records out, "
              "check_data.py lists them all", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # Ctrl-C: one line (every rank gets it; the main one speaks), no traceback
        from checkpoints import interrupted
        sys.exit(interrupted("train.py"))

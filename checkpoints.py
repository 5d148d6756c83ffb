"""
A run's folders: resumable checkpoints (written atomically, found, checked), the stage folder that exists only when
complete, and what --resume and --overwrite decide before anything is built. train.py calls these; tests kill a run
at each point of a save and check that it resumes to the same result (tests/test_resume.py).

    out_dir/<n>_<stage>.partial/checkpoints/step_N/   while the stage trains (model, optimizer, RNG per rank,
                                                      scheduler.pt, trainer.json: step, processes, losses, config)
    out_dir/<n>_<stage>/                              the same folder renamed once its model is written
"""
import json
import os
import shutil

from recipes import ConfigError, resume_allowed


# settings that do not change what a run computes: --resume takes them as they are now
RESUME_FREE = {"resume", "resume_allow", "overwrite", "out_dir", "log_every", "val_every", "val_batches", "save_every",
               "keep_checkpoints", "tracker", "num_workers", "peak_flops", "feature_cache", "data_val", "images_val",
               "stage_overrides", "threads", "step0"}   # threads: the same losses up to summation order


def latest_checkpoint(work_dir, before=None):
    """The newest complete checkpoint in a stage's working folder (of a step < `before` if given), or None."""
    d = os.path.join(work_dir, "checkpoints")
    done = sorted(n for n in os.listdir(d) if n.startswith("step_") and not n.endswith(".tmp")) if os.path.isdir(d) else []
    done = [n for n in done if before is None or int(n[5:]) < before]
    return os.path.join(d, done[-1]) if done else None


def finished(stage_dir):
    return os.path.isfile(os.path.join(stage_dir, "train_config.json"))   # written last, before the rename


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read {what}: {e}") from None


def read_trainer_state(ckpt):
    state = read_json(os.path.join(ckpt, "trainer.json"), "the checkpoint's step and settings")
    step = state.get("step") if isinstance(state, dict) else None
    if type(step) is not int or step < 0 or not isinstance(state.get("config"), dict):
        raise ConfigError(f"{ckpt}/trainer.json: not a valid checkpoint record (step {step!r}); delete that checkpoint")
    return state


def check_resume(saved, cfg, source, processes=None, world=None):
    """The settings `source` was made with against today's. A change that would make the run differ from an
    uninterrupted one is refused with the list, unless named in --resume_allow; returns the accepted changes."""
    now = json.loads(json.dumps(cfg, default=str))
    diffs = {k: (saved[k], now[k]) for k in saved if k in now and k not in RESUME_FREE and saved[k] != now[k]}
    if processes is not None and processes != world:
        diffs["processes"] = (processes, world)
    refused = sorted(set(diffs) - resume_allowed(cfg))
    if refused:
        raise ConfigError(f"--resume: {source} was made with other settings, so the run would not continue exactly: "
                          + "; ".join(f"{k} {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in refused)
                          + f". Restore them, or accept the change with --resume_allow={','.join(refused)}")
    return diffs


def plan_output(cfg, scfgs, stage_dirs, accelerator):
    """Before anything is built: an out_dir that holds this run's stage folders or checkpoints is resumed (and
    every saved setting checked against today's), replaced (--overwrite) or refused. A working folder without a
    checkpoint holds nothing to resume: it is started afresh."""
    found = [d for d in stage_dirs if os.path.lexists(d)] + [d + ".partial" for d in stage_dirs
                                                            if latest_checkpoint(d + ".partial")]
    if cfg["overwrite"]:
        if accelerator.is_main_process:
            for d in found:
                print(f"--overwrite: deleting {d}")
                shutil.rmtree(d) if os.path.isdir(d) and not os.path.islink(d) else os.remove(d)
        accelerator.wait_for_everyone()
        return
    if found and not cfg["resume"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a run ({', '.join(map(os.path.basename, found))}): "
                          "--resume continues it, --overwrite deletes it and starts over")
    if cfg["resume"] and not found and accelerator.is_main_process:
        print(f"--resume: nothing to resume in {cfg['out_dir']}; starting from the beginning")
    for scfg, d in zip(scfgs, stage_dirs):
        if os.path.isdir(d):
            if not finished(d):
                raise ConfigError(f"{d} is not a complete stage folder (no train_config.json): move it away, "
                                  "or --overwrite")
            check_resume(read_json(os.path.join(d, "train_config.json"), "its settings"), scfg, f"finished stage {d}")
        elif latest_checkpoint(d + ".partial"):
            ckpt = latest_checkpoint(d + ".partial")
            state = read_trainer_state(ckpt)
            check_resume(state["config"], scfg, ckpt, state.get("processes"), accelerator.num_processes)
            rng = os.path.join(ckpt, f"random_states_{accelerator.process_index}.pkl")
            try:
                from accelerate.utils import load
                load(rng)["torch_manual_seed"]
            except Exception as e:   # noqa: BLE001 -- missing, truncated, not a state: all mean "not exact"
                if "rng" not in resume_allowed(cfg):
                    raise ConfigError(f"--resume: {rng} is missing or unreadable ({type(e).__name__}), so dropout "
                                      "would not repeat the uninterrupted run; --resume_allow=rng continues anyway")
                print(f"--resume_allow=rng: {rng} unreadable; continuing with this process's current RNG state")


def check_finite(accelerator, params, what):
    """Raise (on every rank) if any rank holds a non-finite weight: such weights are never saved."""
    import torch
    ok = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in params)), device=accelerator.device)
    if float(accelerator.reduce(ok, "sum")) < accelerator.num_processes:
        raise RuntimeError(f"non-finite weights before {what}: not saved")


def save_checkpoint(accelerator, work_dir, step, cfg, scheduler, params=(), losses=()):
    """accelerator.save_state into step_N.tmp, then an atomic rename: a crash mid-save leaves the previous
    checkpoint as the latest complete one. Keeps the newest cfg['keep_checkpoints']."""
    import torch
    check_finite(accelerator, params, f"the checkpoint of step {step}")
    d = os.path.join(work_dir, "checkpoints")
    final, tmp = os.path.join(d, f"step_{step:08d}"), os.path.join(d, f"step_{step:08d}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()   # every rank has written its shard / RNG state before the rename
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            with open(os.path.join(tmp, "trainer.json"), "w") as f:
                json.dump({"step": step, "processes": accelerator.num_processes, "losses": list(losses),
                           "config": cfg}, f, indent=1, default=str)
    except (OSError, RuntimeError) as e:   # disk full reads "unexpected pos N vs M" from torch.save alone
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(d).free / 2 ** 20 if os.path.isdir(d) else float("nan")
        raise RuntimeError(f"could not write the checkpoint of step {step} to {tmp} ({free:.0f} MiB free there): "
                           f"{e}") from e
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)   # a stale one of the same step, from a resumed run
        os.replace(tmp, final)
        done = sorted(n for n in os.listdir(d) if n.startswith("step_") and not n.endswith(".tmp"))
        for old in done[:-cfg["keep_checkpoints"]]:
            shutil.rmtree(os.path.join(d, old))
    accelerator.wait_for_everyone()

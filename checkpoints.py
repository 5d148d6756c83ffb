"""
A run's folders: resumable checkpoints (written atomically, found, checked), the stage folder that exists only when
complete, the run's record and lock, and what --resume and --overwrite decide before anything is built. train.py
calls these; tests kill a run at each point of a save and check that it resumes to the same result
(tests/test_resume.py), and point runs at folders they did not make (tests/test_run_folder.py).

    out_dir/tinyllava_run.json                        the run's record: its stages and settings (no model uses
                                                      this name, so a model folder is never mistaken for a run)
    out_dir/tinyllava_run.lock                        held (flock) by the main process while the run lives
    out_dir/<n>_<stage>.partial/checkpoints/step_N/   while the stage trains (model, optimizer, RNG per rank,
                                                      scheduler.pt, trainer.json: step, processes, losses, config
                                                      with the data files' fingerprints)
    out_dir/<n>_<stage>/                              the same folder renamed once its model is written
"""
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import time

from recipes import ConfigError, resume_allowed


# settings that do not change what a run computes: --resume takes them as they are now
RESUME_FREE = {"resume", "resume_allow", "overwrite", "out_dir", "log_every", "val_every", "val_batches", "save_every",
               "keep_checkpoints", "tracker", "num_workers", "peak_flops", "feature_cache", "data_val", "images_val",
               "stage_overrides", "threads", "step0", "data_files",   # threads: the same losses up to summation order
               "check_data_at_start"}
# data_files: compared by check_data_files, which names the file (refused unless --resume_allow=data)
RUN_RECORD, RUN_LOCK, TRACKER_DIR = "tinyllava_run.json", "tinyllava_run.lock", "tinyllava-nano"
IGNORED = (".log", ".out", ".txt")   # a shell's `> out_dir/train.log`, nohup.out: never read or written by a run


def latest_checkpoint(work_dir, before=None):
    """The newest complete checkpoint in a stage's working folder (of a step < `before` if given), or None."""
    d = os.path.join(work_dir, "checkpoints")
    done = sorted(n for n in os.listdir(d) if n.startswith("step_") and not n.endswith(".tmp")) if os.path.isdir(d) else []
    done = [n for n in done if before is None or int(n[5:]) < before]
    return os.path.join(d, done[-1]) if done else None


def finished(stage_dir):
    """A stage folder with its record (train_config.json, written last, before the rename); stage_record checks it."""
    return os.path.isfile(os.path.join(stage_dir, "train_config.json"))


def stage_record(stage_dir):
    """A finished stage's settings and losses, checked: train_config.json an object holding every setting with the
    type of its default, losses.json a list of numbers. Anything else is one ConfigError naming the file."""
    from recipes import DEFAULTS
    path = os.path.join(stage_dir, "train_config.json")
    cfg = read_json(path, "the finished stage's settings")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a stage record (a JSON object of settings), but {type(cfg).__name__}; "
                          "the stage is not finished: move the folder away, or --overwrite")
    # every version's record holds these; a setting added since may be missing from an older one, not mistyped
    wrong = [k for k in ("stage", "template", "data") if not isinstance(cfg.get(k), str)]
    wrong += [k for k in ("seed", "lr", "global_batch_size", "llm") if k not in cfg]
    wrong += [k for k, d in DEFAULTS.items() if k in cfg and k not in wrong and not (
        isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool) if type(d) in (int, float)
        else isinstance(cfg[k], type(d)) or k == "gradient_checkpointing" and isinstance(cfg[k], bool))]
    if wrong:
        shown = ", ".join(f"{k} missing" if k not in cfg else f"{k}={cfg[k]!r}" for k in wrong[:4]) + \
            " ..." * (len(wrong) > 4)
        raise ConfigError(f"{path}: not a valid stage record ({len(wrong)} settings missing or of the wrong type: "
                          f"{shown}); the stage is not finished: move the folder away, or --overwrite")
    losses = read_json(os.path.join(stage_dir, "losses.json"), "the finished stage's losses")
    if not isinstance(losses, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses):
        raise ConfigError(f"{stage_dir}/losses.json: not a list of numbers; the stage is not finished: move the folder "
                          "away, or --overwrite")
    return cfg, losses


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read {what}: {getattr(e, 'strerror', None) or e}") from None


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


# ----------------------------------------------------------------------------- the run's folder, record and lock
class RunLock:
    """out_dir/tinyllava_run.lock, held with flock by the main process for the life of the run: the kernel lets go
    when the process dies (SIGKILL included), so a lock left by a killed run is stale by construction. The file
    says who holds it (pid, host, start time) for the message a second run gets."""
    fd = None

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, RUN_LOCK)

    def acquire(self):
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not written its name yet"
                os.close(fd)
                raise ConfigError(f"{os.path.dirname(self.path)} is in use by another run ({holder}; lock "
                                  f"{self.path}): wait for it to end, or use another --out_dir") from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break   # (else the holder removed the file between our open and lock: take the new one)
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.unlink(self.path)   # while still held: no other run can be between our unlink and release
            os.close(self.fd)
            self.fd = None


LOCK = None   # the main process's RunLock while a run lives (train.main releases it)


def run_record(out_dir):
    """The record of the run in out_dir: ours (tinyllava_run.json), an earlier version's (config.json holding our
    settings), or None."""
    path = os.path.join(out_dir, RUN_RECORD)
    if os.path.lexists(path):
        rec = read_json(path, "the run's record")
        if not isinstance(rec, dict) or not isinstance(rec.get("stages"), list):
            raise ConfigError(f"{path}: not a run record (an object with the run's stages); move it away")
        return rec
    legacy = os.path.join(out_dir, "config.json")   # before the record had its own name
    try:
        with open(legacy) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(old, dict) and {"recipe", "stage_overrides", "out_dir"} <= set(old) and "model_type" not in old:
        from recipes import stage_configs
        try:
            names = [s["stage"] for s in stage_configs(old)]
        except Exception:   # noqa: BLE001 -- not ours after all: then it is a foreign file like any other
            return None
        return {"stages": names, "legacy": "config.json"}
    return None


def foreign_entries(out_dir, own):
    """What out_dir holds that a run of ours did not write (logs and hidden files aside)."""
    return sorted(n for n in os.listdir(out_dir) if n not in own and not n.startswith(".") and not n.endswith(IGNORED))


def stage_folder_names(names):
    return [f"{i + 1}_{n}" for i, n in enumerate(names)]


def claim_out_dir(cfg, scfgs):
    """Main process, before anything is built: create out_dir, take its lock, and check that it holds nothing but
    this run (the same stages) or nothing at all. A model folder, someone's files or another recipe's run is refused
    with the names; --overwrite replaces a run of ours (its recorded stage folders), never anything else.
    Returns the lock (also in LOCK)."""
    global LOCK
    out = cfg["out_dir"]
    if not out:
        raise ConfigError("--out_dir is empty: name the folder the run writes to")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out_dir={out}: exists and is not a folder")
    created = not os.path.lexists(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = RunLock(out).acquire()
    except OSError as e:
        raise ConfigError(f"--out_dir={out}: cannot write there ({e.strerror or e})") from None
    try:
        names = [s["stage"] for s in scfgs]
        rec = run_record(out)
        if rec is None:
            mine = {RUN_RECORD, RUN_LOCK}
        else:
            mine = {RUN_RECORD, RUN_LOCK, TRACKER_DIR, *rec.get("also", []), rec.get("legacy", RUN_RECORD)}
            mine |= {n + s for n in stage_folder_names(rec["stages"]) for s in ("", ".partial")}
        if cfg["feature_cache"] and os.path.dirname(os.path.abspath(cfg["feature_cache"])) == os.path.abspath(out):
            mine.add(os.path.basename(os.path.abspath(cfg["feature_cache"])))   # the user named it: theirs to keep
        foreign = foreign_entries(out, mine)
        if foreign:
            raise ConfigError(f"--out_dir={out} holds files this run did not write ({', '.join(foreign[:6])}"
                              f"{', ...' * (len(foreign) > 6)}): a model folder or someone's files? Nothing there is "
                              "touched; choose a new or empty --out_dir")
        if rec is not None and rec["stages"] != names:
            if not cfg["overwrite"]:
                raise ConfigError(f"--out_dir={out} holds a run of other stages ({', '.join(map(str, rec['stages']))}; "
                                  f"this command: {', '.join(names)}): use another --out_dir, or --overwrite to delete "
                                  "that run's stage folders")
            for n in stage_folder_names(rec["stages"]):
                for d in (os.path.join(out, n), os.path.join(out, n + ".partial")):
                    if os.path.lexists(d):
                        print(f"--overwrite: deleting {d} (a stage of the run recorded there)")
                        shutil.rmtree(d) if os.path.isdir(d) and not os.path.islink(d) else os.remove(d)
        if rec is not None and rec.get("legacy"):
            print(f"{out}/config.json: the record of an earlier version's run; this version's is {RUN_RECORD}")
    except BaseException:
        lock.release()
        if created and not os.listdir(out):   # a refused run leaves no folder of its own behind
            os.rmdir(out)
        raise
    LOCK = lock
    return lock


def write_run_record(cfg, scfgs, argv):
    """out_dir/tinyllava_run.json: the stages, the command and the settings (an earlier version's config.json,
    when it was the record, stays listed as the run's own)."""
    names, prev = [s["stage"] for s in scfgs], run_record(cfg["out_dir"]) or {}
    also = sorted(set(prev.get("also", [])) | ({prev["legacy"]} if "legacy" in prev else set()))
    record = {"written_by": "tinyllava-nano train.py", "stages": names, "stage_folders": stage_folder_names(names),
              "also": also,
              "command": [os.path.basename(sys.argv[0]), *argv], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "config": cfg}
    write_atomic(os.path.join(cfg["out_dir"], RUN_RECORD), json.dumps(record, indent=1, default=str))


def release_lock():
    global LOCK
    if LOCK is not None:
        LOCK.release()
        LOCK = None


def write_atomic(path, text):
    """text to path via a temp name in the same folder and one rename; the temp file never outlives a failure."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise ConfigError(f"{path}: cannot write it ({e.strerror or e})") from None
        raise


def one_rank_decides(accelerator, decide, timeout=None):
    """Run decide() on the main process only; every rank raises the ConfigError it raised (or none). timeout:
    seconds the other ranks may wait (over a gloo group of their own), for a decision longer than the collectives'
    limit (NCCL: 10 minutes)."""
    err, group = None, None
    if accelerator.num_processes > 1 and timeout:   # made by every rank before the wait
        import datetime

        import torch.distributed as dist
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    if accelerator.is_main_process:
        try:
            decide()
        except ConfigError as e:
            err = str(e)
    if accelerator.num_processes > 1:
        import torch.distributed as dist
        box = [err]
        dist.broadcast_object_list(box, src=0, group=group)
        err = box[0]
        if group is not None:
            dist.destroy_process_group(group)
    if err is not None:
        raise ConfigError(err)


# ----------------------------------------------------------------------------- the data a checkpoint was made on
def fingerprint(path):
    """A data file's size, mtime and sha256 (1 GB: ~2 s), recorded in every checkpoint of its stage."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime": st.st_mtime, "sha256": h.hexdigest()}


def check_data_files(saved, cfg, source):
    """The data files a checkpoint was made on against what is on disk now: a changed file (size or content; a new
    mtime alone is not a change) is refused with the file named, unless --resume_allow=data."""
    from recipes import resume_allowed
    changed = []
    for key, old in (saved.get("data_files") or {}).items():
        path = cfg.get(key) or old.get("path")
        try:
            now = fingerprint(path)
        except OSError as e:
            changed.append(f"{key} {path}: {e.strerror or e}")
            continue
        if now["size"] != old.get("size"):
            changed.append(f"{key} {path}: {old.get('size')} -> {now['size']} bytes")
        elif now["sha256"] != old.get("sha256"):
            changed.append(f"{key} {path}: same size, other content")
    if changed and "data" not in resume_allowed(cfg):
        raise ConfigError(f"--resume: the data changed since {source}, so the run would not continue at the same "
                          f"records: {'; '.join(changed)}. Restore the file, or continue on the new data (its epoch "
                          "position kept, not exact) with --resume_allow=data")
    return changed


def plan_output(cfg, scfgs, stage_dirs, accelerator, argv=()):
    """Before anything is built: out_dir is claimed (claim_out_dir: locked, nothing foreign in it, the same stages);
    one that holds this run's stage folders or checkpoints is resumed (and every saved setting and data file checked
    against today's), replaced (--overwrite) or refused. A working folder without a checkpoint holds nothing to
    resume: it is started afresh."""
    one_rank_decides(accelerator, lambda: claim_out_dir(cfg, scfgs))
    try:
        found = [d for d in stage_dirs if os.path.lexists(d)] + [d + ".partial" for d in stage_dirs
                                                                if latest_checkpoint(d + ".partial")]
        if cfg["overwrite"]:
            if accelerator.is_main_process:
                for d in found:
                    print(f"--overwrite: deleting {d}")
                    shutil.rmtree(d) if os.path.isdir(d) and not os.path.islink(d) else os.remove(d)
            accelerator.wait_for_everyone()
            found = []
        if found and not cfg["resume"]:
            raise ConfigError(f"{cfg['out_dir']} already holds a run ({', '.join(map(os.path.basename, found))}): "
                              "--resume continues it, --overwrite deletes it and starts over")
        if cfg["resume"] and not found and accelerator.is_main_process:
            print(f"--resume: nothing to resume in {cfg['out_dir']}; starting from the beginning")
        for scfg, d in zip(scfgs, stage_dirs) if not cfg["overwrite"] else ():
            if os.path.isdir(d):
                if not finished(d):
                    raise ConfigError(f"{d} is not a complete stage folder (no train_config.json): move it away, "
                                      "or --overwrite")
                check_resume(stage_record(d)[0], scfg, f"finished stage {d}")
            elif latest_checkpoint(d + ".partial"):
                ckpt = latest_checkpoint(d + ".partial")
                state = read_trainer_state(ckpt)
                check_resume(state["config"], scfg, ckpt, state.get("processes"), accelerator.num_processes)
                changed = check_data_files(state["config"], scfg, ckpt)
                if changed and accelerator.is_main_process:
                    print(f"--resume_allow=data: changed since {ckpt}: {'; '.join(changed)}")
                rng = os.path.join(ckpt, f"random_states_{accelerator.process_index}.pkl")
                try:
                    from accelerate.utils import load
                    load(rng)["torch_manual_seed"]
                except Exception as e:   # noqa: BLE001 -- missing, truncated, not a state: all mean "not exact"
                    if "rng" not in resume_allowed(cfg):
                        raise ConfigError(f"--resume: {rng} is missing or unreadable ({type(e).__name__}), so dropout "
                                          "would not repeat the uninterrupted run; --resume_allow=rng continues anyway")
                    print(f"--resume_allow=rng: {rng} unreadable; continuing with this process's current RNG state")
        one_rank_decides(accelerator, lambda: write_run_record(cfg, scfgs, argv))
    except BaseException:
        release_lock()
        raise


RUN = {}   # this process's run (train.main fills it): its stage folders and arguments


def interrupted(script, argv=None):
    """Ctrl-C: the one line a run ends with (on the main rank; every rank gets the signal), saying what was kept
    (each stage's finished folder or latest checkpoint) and the command that continues; returns exit status 130."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 130
    kept = []
    for d in RUN.get("stage_dirs", []):
        if finished(d):
            kept.append(f"{d} (finished)")
        elif latest_checkpoint(d + ".partial"):
            kept.append(latest_checkpoint(d + ".partial"))
    argv = argv if argv is not None else RUN.get("argv", sys.argv[1:])
    args = [a for a in argv if a.split("=")[0] not in ("--overwrite", "--resume")]
    again = shlex.join(["python", os.path.basename(sys.argv[0]), *args, "--resume"])
    print(f"{script}: interrupted; kept {', '.join(kept)}; continue with: {again}" if kept else
          f"{script}: interrupted before the first checkpoint, nothing kept (a checkpoint is written every save_every "
          "steps); run the command again", file=sys.stderr)
    return 130


def check_finite(accelerator, params, what):
    """Raise (on every rank) if any rank holds a non-finite weight: such weights are never saved."""
    import torch
    ok = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in params)), device=accelerator.device)
    if float(accelerator.reduce(ok, "sum")) < accelerator.num_processes:
        raise RuntimeError(f"non-finite weights before {what}: not saved")


def save_checkpoint(accelerator, work_dir, step, cfg, scheduler, params=(), losses=()):
    """accelerator.save_state into step_N.tmp, then an atomic rename: a crash mid-save leaves the previous
    checkpoint as the latest complete one. Keeps the newest cfg['keep_checkpoints'] (0: the newest one, and none
    once the stage is finished)."""
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
        for old in done[:-max(1, cfg["keep_checkpoints"])]:
            shutil.rmtree(os.path.join(d, old))
    accelerator.wait_for_everyone()

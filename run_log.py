"""
What a run reports while it trains, and where: the numbers of each logged step (the log line, the trackers and
metrics.jsonl), the loss curve (loss.png, drawn with Pillow: no plotting library), which trackers a run may name,
and the third-party messages a normal run silences. train.py calls these; nothing here imports torch or another
module of ours at import time.

    out_dir/<n>_<stage>/losses.json     the loss of every optimizer step: a list of numbers, resumes included
    out_dir/<n>_<stage>/metrics.jsonl   one JSON object per logged step, a line appended (and flushed) as it is
                                        logged, so a crash loses none; a resumed stage drops the rows after its
                                        checkpoint and goes on from the totals of the last one it keeps:
        step, epoch, loss, lr, grad_norm   as the log line (grad_norm: the global norm before clipping)
        samples_per_s, tokens_per_s, mfu_percent
                                        of the whole job (all processes) since this process started the stage
                                        (a resumed stage: since the resume); MFU: flops.mfu
        elapsed_s, samples, tokens, flops
                                        the stage's totals so far (seconds of training, model FLOPs), resumes
                                        included; a row is also written at each checkpoint's step, so they resume
        a validation: {"step", "val_loss", "elapsed_s"}
    --tracker: the same numbers (but step) as <stage>/<name>, against one step count for the whole run
"""
import json
import math
import os
import time

METRICS = "metrics.jsonl"
TOTALS = ("elapsed_s", "samples", "tokens", "flops")
PIP = {"comet_ml": "comet-ml"}   # a tracker's pip package, where its name is not the tracker's


# ----------------------------------------------------------------------------- trackers
def tracker_names(tracker):
    """--tracker: one name or several, comma-separated ("" = none)."""
    return [t.strip() for t in tracker.split(",") if t.strip()]


def tracker_problems(tracker):
    """A line per name that cannot start: not a tracker Accelerate knows (its own, or one registered with
    accelerate.tracking.register_tracker_class), or one whose package is not installed, which Accelerate reports
    only at debug level, and the run would train untracked."""
    names = tracker_names(tracker)
    if not names:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType
    available, builtin = {str(t) for t in get_available_trackers()}, {str(t) for t in LoggerType}
    problems = []
    for name in names:
        if name == "all" and not available:
            problems.append("--tracker=all: no tracker package is installed (pip install tensorboard, or wandb, ...)")
        elif name != "all" and name not in LOGGER_TYPE_TO_CLASS:
            problems.append(f"--tracker={name}: unknown tracker; valid: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        elif name in builtin and name != "all" and name not in available:
            problems.append(f"--tracker={name}: the {name} package is not installed: pip install "
                            f"{PIP.get(name, name)} (or leave --tracker empty to train untracked)")
    return problems


# ----------------------------------------------------------------------------- the numbers of a step
class StepLog:
    """One stage's running totals (samples, tokens and model FLOPs of the whole job, as reduced over the processes
    each step) and the row each logged step writes to metrics.jsonl (main process only: `path` None elsewhere)."""

    def __init__(self, path, processes, peak_flops):
        self.path, self.processes, self.peak_flops = path, processes, peak_flops
        self.before = dict.fromkeys(TOTALS, 0.0)   # what the rows this run keeps had reached
        self.samples = self.tokens = self.flops = 0.0   # this process's run of the stage
        self.t0 = time.time()

    def resume(self, step):
        """A stage resumed from the checkpoint of `step`: rows after it are dropped (that run goes again), and the
        totals run on from the last row kept."""
        rows = read_metrics(self.path) if self.path else []
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) < len(rows):
            with open(f"{self.path}.tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(f"{self.path}.tmp", self.path)
        last = next((r for r in reversed(kept) if "samples" in r), {})
        self.before = {k: float(last.get(k, 0.0)) for k in TOTALS}

    def start(self):
        self.t0 = time.time()

    def add(self, samples, tokens, flops):
        self.samples, self.tokens, self.flops = self.samples + samples, self.tokens + tokens, self.flops + flops

    def row(self, step, steps_per_epoch, loss, lr, grad_norm):
        from flops import mfu
        dt = max(time.time() - self.t0, 1e-9)
        return dict(step=step, epoch=step / steps_per_epoch, loss=loss, lr=lr, grad_norm=grad_norm,
                    samples_per_s=self.samples / dt, tokens_per_s=self.tokens / dt,
                    mfu_percent=100 * mfu(self.flops, dt, self.peak_flops, self.processes),
                    elapsed_s=self.before["elapsed_s"] + dt, samples=self.before["samples"] + self.samples,
                    tokens=self.before["tokens"] + self.tokens, flops=self.before["flops"] + self.flops)

    def val_row(self, step, val_loss):
        return dict(step=step, val_loss=val_loss, elapsed_s=self.before["elapsed_s"] + time.time() - self.t0)

    def write(self, row):
        """One line, flushed: a crash or a kill right after loses nothing written before it."""
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def tracked(row, stage):
    """A row as tracker values: <stage>/<name>, every number but the step."""
    return {f"{stage}/{k}": v for k, v in row.items() if k != "step"}


def log_line(row, total):
    return (f"step {row['step']}/{total} (epoch {row['epoch']:.2f}) | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
            f"grad {row['grad_norm']:.3f} | {row['samples_per_s']:.1f} samples/s | {row['tokens_per_s']:.0f} tok/s | "
            f"MFU {row['mfu_percent']:.1f}%")


def read_metrics(path):
    """metrics.jsonl's rows; a line torn by a crash is left out."""
    rows = []
    if path and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return [r for r in rows if isinstance(r, dict)]


# ----------------------------------------------------------------------------- loss.png
def nice_step(span, parts=6):
    """The smallest round step (1, 2 or 5 x 10^k) that cuts `span` into at most `parts` parts."""
    raw = span / parts
    k = math.floor(math.log10(raw))
    return next(m * 10.0 ** k for m in (1, 2, 5, 10) if m * 10.0 ** k >= raw * (1 - 1e-9))


def _round(x):
    return float(f"{x:.6g}")   # 0.30000000000000004 -> 0.3


def linear_ticks(lo, hi, parts=6):
    """Round ticks (a nice_step apart) from the last at or below lo to the first at or above hi."""
    step = nice_step(hi - lo, parts)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [_round(k * step) for k in range(first, last + 1)]


def log_ticks(lo, hi):
    """1, 2 and 5 x 10^k from the last at or below lo to the first at or above hi (0 < lo < hi); only the powers
    of ten where that would be over 10 ticks."""
    for mantissas in ((1, 2, 5), (1,)):
        seq = [_round(m * 10.0 ** k) for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
               for m in mantissas]
        below, above = max(t for t in seq if t <= lo * (1 + 1e-9)), min(t for t in seq if t >= hi * (1 - 1e-9))
        ticks = [t for t in seq if below <= t <= above]
        if len(ticks) <= 10:
            return ticks
    return ticks


def loss_axis(lo, hi):
    """loss.png's y axis for losses from lo to hi: (log scale?, ticks), the axis running from the first tick to the
    last. Log where the losses are positive and span a decade or more (a finetune loss falling from 5 to 0.05 is a
    flat line near 0 on a linear axis); linear otherwise, and around a flat line."""
    if lo > 0 and hi / lo >= 10:
        return True, log_ticks(lo, hi)
    if hi <= lo:
        lo, hi = lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0)
    return False, linear_ticks(lo, hi)


def tick_label(t):
    return f"{t:g}"


def plot_losses(losses, path, title, size=(640, 360)):
    """loss.png: the loss of every step (light) and its running mean (dark) against labelled axes (loss_axis; the
    steps on round ticks), drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont
    points = [(i, y) for i, y in enumerate(losses, 1) if math.isfinite(y)]
    if len(points) < 2:
        return
    log, yt = loss_axis(min(y for _, y in points), max(y for _, y in points))
    xt = [int(t) for t in linear_ticks(0, len(losses), 6)] if len(losses) > 6 else list(range(0, len(losses) + 1))
    (w, h), (left, top, right, bottom) = size, (64, 40, 24, 44)
    f = (lambda v: math.log10(max(v, yt[0]))) if log else (lambda v: v)
    X = lambda s: left + (w - left - right) * (s - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    Y = lambda v: h - bottom - (h - top - bottom) * (f(v) - f(yt[0])) / (f(yt[-1]) - f(yt[0]))  # noqa: E731
    xy = [(X(i), Y(y)) for i, y in points]
    r = min(10, len(xy) // 20)   # a centred mean over up to 21 steps, narrower on short runs
    mean = [(x, sum(p[1] for p in xy[max(0, k - r):k + r + 1]) / len(xy[max(0, k - r):k + r + 1]))
            for k, (x, _) in enumerate(xy)]
    try:
        font = ImageFont.load_default(size=12)
    except (TypeError, ImportError):   # Pillow < 10.1 or no FreeType: the small bitmap font
        font = ImageFont.load_default()
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for t in yt:
        d.line([(left, Y(t)), (w - right, Y(t))], fill=(228, 228, 228))
        d.line([(left - 4, Y(t)), (left, Y(t))], fill="black")
        tw, th = d.textbbox((0, 0), tick_label(t), font=font)[2:]
        d.text((left - 7 - tw, Y(t) - th / 2 - 1), tick_label(t), fill="black", font=font)
    for t in xt:
        d.line([(X(t), h - bottom), (X(t), h - bottom + 4)], fill="black")
        tw = d.textbbox((0, 0), str(t), font=font)[2]
        d.text((X(t) - tw / 2, h - bottom + 7), str(t), fill="black", font=font)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.line(xy, fill=(150, 180, 230), width=1)
    d.line(mean, fill=(20, 60, 160), width=2)
    d.text((left, 12), f"{title}: training loss per step" + (" (log scale)" if log else ""), fill="black", font=font)
    d.text((8, top - 16), "loss", fill="black", font=font)
    d.text(((left + w - right) / 2 - 12, h - 18), "step", fill="black", font=font)
    img.save(path)


# ----------------------------------------------------------------------------- third-party noise
class _Drop:
    """A logging filter that drops the records whose message contains `text`, nothing else."""

    def __init__(self, text):
        self.text = text

    def __eq__(self, other):   # logging.Logger.addFilter adds a filter once: the same text is the same filter
        return isinstance(other, _Drop) and other.text == self.text

    def __hash__(self):
        return hash(self.text)

    def filter(self, record):
        return self.text not in record.getMessage()


def drop_message(logger_name, text):
    """Silence one message of one third-party logger at its source (idempotent)."""
    import logging
    logging.getLogger(logger_name).addFilter(_Drop(text))


def quiet_third_party():
    """What a normal run would print though nothing is wrong, silenced where it is made, each message alone:
    - Accelerate's save_state: "Removed shared tensor {'language_model.lm_head.weight'} while saving" at each
      checkpoint of an LLM whose head is tied to its embedding (demo's, Gemma's, Qwen2-0.5B's). safetensors keeps a
      shared tensor once; load_state loads into the model, where the head is still the embedding, so a checkpoint
      resumes exactly (tests/test_resume.py)."""
    drop_message("accelerate.utils.other", "Removed shared tensor")

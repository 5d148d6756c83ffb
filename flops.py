"""
FLOPs and MFU: the model FLOPs of a training step, and this machine's matmul peak they are divided by.
train.py logs MFU = train_flops(...) of every process summed over the steps / seconds / (processes x one
process's peak, process_peak: the job's peak); bench.py reports the same numbers and the split of a step's FLOPs
into its parts (tower, connector, LLM body, attention, LM head).

Model FLOPs: 2 per multiply-add of every Linear and 4*T^2*d per attention layer (nanoGPT/PaLM, no causal
halving), the LM head only where the loss needs it, padding excluded; the tower and connector counted once per image
by torch's FlopCounterMode (tests/test_perf.py checks the whole count against it); frozen parts forward only, plus
the activation gradients that flow through them to a trainable part below. Work a loop spends beyond that
(recomputation under gradient checkpointing, zero images, padding, logits nobody needs) is not model FLOPs.

The peak, and the thread count train.py picks on a CPU, are measured once per machine and cached in
$XDG_CACHE_HOME/tinyllava-nano/machine.json (see `measured`). Memory: TensorMemory (a step's live tensors, for
auto checkpointing and bench.py), RSS and free memory. A module of its own so that train.py and bench.py
both use it without importing each other (bench.py imports train.py; train.py never imports bench.py).
"""
import json
import os
import time
from functools import partial

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CORES = torch.get_num_threads()   # torch's default, before any stage sets it
PARTS = ("tower", "connector", "llm", "attention", "head")


# ----------------------------------------------------------------------------- model FLOPs
def linear_params(module, trainable=None):
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in module.modules() if isinstance(m, nn.Linear)
               and (trainable is None or m.weight.requires_grad == trainable))   # ds_numel: ZeRO-3 partitions


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def image_flops(model, image_size):
    """Forward FLOPs per image of the tower (as it runs: truncated or not) and of the connector."""
    from torch.utils.flop_counter import FlopCounterMode
    p = next(model.vision_tower.parameters())
    # torch counts SDPA's GPU kernels but not the CPU one: its formula for that one too
    cpu = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention}
    with FlopCounterMode(display=False, custom_mapping=cpu) as tower_count:
        feats = model.vision_tower(torch.zeros(1, 3, *image_size, device=p.device, dtype=p.dtype))
    with FlopCounterMode(display=False) as conn_count:
        model.connector(feats)
    return tower_count.get_total_flops(), conn_count.get_total_flops()


def flop_profile(model, image_size):
    """What train_flops needs of a model, counted once (outside the training loop): which parts train, the LLM's
    Linear and head sizes and attention width, the per-image FLOPs of the tower and connector."""
    lm, cfg = model.language_model, model.language_model.config
    trains = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
    head = lm.get_output_embeddings()
    heads = cfg.num_attention_heads
    head_params = getattr(head.weight, "ds_numel", head.weight.numel()) if head is not None else 0
    head_trains = head is not None and head.weight.requires_grad
    return dict(tower_trains=trains(model.vision_tower), conn_trains=trains(model.connector), llm_trains=trains(lm),
                dec=linear_params(lm) - head_params, head=head_params, layers=cfg.num_hidden_layers,
                dec_trainable=linear_params(lm, trainable=True) - head_params * head_trains, head_trains=head_trains,
                d_attn=heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
                supervised_only=model.supervised_only_loss, per_image=image_flops(model, image_size))


def train_flops(f, attention_mask, labels, n_images, tower_runs=True, parts=False):
    """Model FLOPs of one forward + backward on a batch; f = flop_profile(model). parts=True: a dict over PARTS."""
    lens = attention_mask.sum(1).double()
    T = float(lens.sum())
    n_head = float((labels[:, 1:] != -100).sum()) if f["supervised_only"] else T
    grads_flow = f["tower_trains"] or f["conn_trains"] or f["llm_trains"]
    passes = 1 + grads_flow   # forward, and the activation gradients if anything below the LLM trains
    attn = 4.0 * f["layers"] * f["d_attn"] * float((lens ** 2).sum())
    tower_f, conn_f = f["per_image"]
    out = dict(tower=n_images * tower_f * (3 if f["tower_trains"] else 1) if tower_runs else 0.0,
               connector=n_images * conn_f * (1 + int(f["conn_trains"]) + int(f["tower_trains"])),
               llm=2.0 * T * (f["dec"] * passes + f["dec_trainable"] * f["llm_trains"]),   # + weight gradients
               attention=attn * (1 + 2 * grads_flow),
               head=2.0 * f["head"] * n_head * (passes + (f["llm_trains"] and f["head_trains"])))
    return out if parts else sum(out.values())


def analytic_profile(llm, tower, stage):
    """flop_profile of a shape from its sizes alone (no model built), for the share check at full size."""
    (family, d, layers, _, ffn, vocab), (dv, lv, _, fv, px, patch) = llm, tower
    n = (px // patch) ** 2
    tower_f = 2 * n * 3 * patch * patch * dv + (lv - 1) * (2 * n * (4 * dv * dv + 2 * dv * fv) + 4 * n * n * dv)
    dec = layers * (4 * d * d + (2 if family == "phi" else 3) * d * ffn)   # q k v o + the MLP (Llama: gated)
    full = stage == "finetune"
    return dict(tower_trains=False, conn_trains=True, llm_trains=full, dec=dec, head=d * vocab, layers=layers,
                dec_trainable=dec * full, head_trains=full, d_attn=d, supervised_only=True,
                per_image=(tower_f, 2 * n * (dv * d + d * d)))


def shares(profile, lengths, n_image_tokens):
    """Each part's share of a step's model FLOPs (PARTS) for samples of these (prompt, answer) lengths."""
    total = {}
    for prompt, answer in lengths:
        mask = torch.ones(1, n_image_tokens + prompt + answer)
        labels = torch.full(mask.shape, -100)
        labels[0, -answer:] = 0
        for k, v in train_flops(profile, mask, labels, 1, parts=True).items():
            total[k] = total.get(k, 0.0) + v
    return {k: v / sum(total.values()) for k, v in total.items()}


# ----------------------------------------------------------------------------- this machine
def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def measured(key, measure):
    """A measurement of this machine (its name is in `key`), taken once and kept in
    $XDG_CACHE_HOME/tinyllava-nano/machine.json, so the MFU's peak and the thread count stay put between runs.
    It never draws from the global RNG: a run's losses do not depend on whether the cache was warm."""
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tinyllava-nano",
                        "machine.json")
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        with torch.random.fork_rng(devices=[]):
            cache[key] = measure()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.{os.getpid()}.tmp", "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(f"{path}.{os.getpid()}.tmp", path)
        except OSError:
            pass   # a read-only home: measured again next run
    return cache[key]


def matmul_peak(dtype=torch.float32, device="cpu", n=None, seconds=1.0):
    """FLOP/s of large square matmuls in `dtype` on this machine, the best of a few timed runs."""
    n = n or (8192 if device != "cpu" else 1536)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    a @ b
    sync()
    best, t_end = 0.0, time.time() + seconds
    while time.time() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def mfu(flops, seconds, peak_flops, processes):
    """Model FLOPs utilisation (a fraction): the whole job's model FLOPs (every process's) per second over the whole
    job's peak, `processes` x `peak_flops`, the peak of one process (train.py's --peak_flops, or process_peak)."""
    return flops / seconds / (processes * peak_flops)


def process_peak(dtype, device, threads, local_processes):
    """One process's share of the matmul peak in `dtype` (FLOP/s), the MFU's denominator x the processes. A GPU: its
    own peak (one per process). A CPU's cores are shared by the processes on the machine: the peak of the cores they
    can use together, min(all cores, processes x threads) threads measured in one process, divided among them. So 2
    processes of 1 thread on 2 cores get the 2-thread peak / 2 each (about a core's), and 2 of 2 threads the same,
    not twice the machine. Measured once per machine and cached (`measured`); a measurement's threads are restored."""
    if device.type != "cpu":
        return measured(f"peak|{machine_name(device)}|{dtype}", partial(matmul_peak, dtype, device.type, seconds=1.0))
    n, before = max(1, min(CORES, threads * local_processes)), torch.get_num_threads()

    def measure():
        torch.set_num_threads(n)
        try:
            return matmul_peak(dtype, "cpu", seconds=1.0)
        finally:
            torch.set_num_threads(before)
    return measured(f"peak|{machine_name(device)}|{dtype}|{n} threads", measure) / local_processes


def fastest_threads(width, rows):
    """1 thread or all cores, whichever runs a (rows x width) @ (width x width) matmul faster: small models lose
    more to threading overhead (and to anything else running) than they gain."""
    a, b, times = torch.ones(rows, width), torch.ones(width, width), {}
    for n in sorted({1, CORES}):
        torch.set_num_threads(n)
        a @ b
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.3:
            a @ b
            k += 1
        times[n] = (time.perf_counter() - t0) / k
    return min(times, key=times.get)


# ----------------------------------------------------------------------------- memory
class TensorMemory(TorchDispatchMode):
    """The peak of the tensor memory made inside the block (activations, gradients, optimizer state, logits;
    weights made before it do not count), as a GPU's allocator counts it but on any device: every op's output
    storage, from the op that makes it until it is freed (seen at the next op). RSS adds the allocator's cache, the
    first step's lazy start-up and fragmentation, all the same for any loop in the process."""

    def __init__(self):
        super().__init__()
        self.live, self.bytes, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.bytes -= self.live.pop(k)[1]
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()   # views and in-place results share an input's storage: not new memory
                if st.data_ptr() and st.data_ptr() not in self.live and st.data_ptr() not in inputs:
                    self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
                    self.bytes += st.nbytes()
        self.peak = max(self.peak, self.bytes)
        return out


def rss_mib(field="VmRSS"):
    """This process's resident memory (VmHWM: its peak) in MiB, from Linux's /proc; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    except (OSError, StopIteration):
        return None


def reset_peak(device):
    """Start a fresh peak-memory window; False where the peak cannot be reset (then it covers the whole process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: VmHWM back to the current RSS
            f.write("5")
        return rss_mib("VmHWM") is not None
    except OSError:
        return False


def peak_since_reset(device):
    """MiB: the peak since reset_peak (GPU: allocated by torch; CPU: the process's RSS)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else rss_mib("VmHWM")


def in_use(device):
    return torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else rss_mib()


def free_mib(device):
    """MiB a step may still take: the GPU's free memory plus what torch holds unused; on a CPU, the kernel's
    MemAvailable, or less under a cgroup (container) limit; without /proc (macOS), half the machine's memory;
    0 where nothing tells (checkpointing then goes on)."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device)) / 2 ** 20
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024
    except (OSError, StopIteration):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / 2 ** 20
        except (AttributeError, ValueError, OSError):
            return 0.0
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                free = min(free, (int(limit) - int(g.read())) / 2 ** 20)
    except (OSError, ValueError):
        pass
    return free

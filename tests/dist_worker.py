"""
Test-only training script for tests/test_distributed.py; not part of the training code, never imported by it.

    accelerate launch <launch flags> tests/dist_worker.py PLAN.json

PLAN.json: {"out": dir, "fsdp_cpu": bool, "jobs": [{"name": ..., "argv": [train.py args], "desync_rank": null | r,
"expect_error": bool, "kill_after": null | [stage, step]}, ...]}. The jobs run one after another in this process
through train.main: process start-up (imports, gloo / DeepSpeed init) is ~90% of a 3-step tiny run on 2 cores, so
one launch serves several runs. Every rank writes, at the end of every stage (where train.py calls
train.final_state):

    <out>/<job>/rank<r>/<n>_<stage>.safetensors   every parameter, full values (ZeRO-3 / FSDP shards gathered)
    <out>/<job>/rank<r>/<n>_<stage>.json          distributed type, world, trainable and optimizer parameter names,
                                                  every step's gradient norm as train.py logs it ("grad X")
    <out>/<job>/rank<r>/<n>_<stage>.grads.safetensors   the gradients of the stage's first step, before clipping
                                                  (where they are on the rank as whole tensors: DDP, FSDP; not ZeRO)
    <out>/<job>/rank<r>/result.json               train.main's return value: final dir and losses per stage
    <out>/rank<r>.log                             this rank's stdout and stderr (main-process-only logging is tested)

Test-only hooks (train.py has none of these):
  desync_rank   that rank's gradient reduction still takes part in every collective (so no rank waits forever)
                but keeps its own local gradient: gradient sync disabled on one rank. DDP: a comm hook; DeepSpeed:
                its deepspeed.comm reductions keep the local tensor during engine.backward; FSDP2: a custom
                reduce-scatter.
  expect_error  the job must raise (on every rank): the error is recorded instead of failing the launch.
  kill_after    SIGKILL every rank right after the checkpoint of [stage, step] is complete on disk.
  fsdp_cpu      Accelerate never turns FSDP on for CPU processes (it silently trains DDP or unsynchronised ranks,
                shared/reference/cpu_feasibility.md §3). This builds the FSDP plugin from the launcher's FSDP_* env
                (i.e. from configs/accelerate/fsdp.yaml) and forces the state to FSDP, the workaround measured there.
"""
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def rank():
    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------- recording
def full_params(accelerator, model):
    """name -> full parameter value on this rank (collective under ZeRO-3 / FSDP: every rank calls it)."""
    from accelerate.utils import DistributedType
    raw = accelerator.unwrap_model(model)
    named = list(raw.named_parameters())
    ds = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type == DistributedType.DEEPSPEED and ds.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone() for n, p in named}
    out = {}
    for n, p in named:
        p = p.detach()
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out


def optimizer_param_ids(accelerator):
    """ids of the model parameters the optimizer of the current stage updates."""
    opt = accelerator._optimizers[-1].optimizer
    for attr in ("bit16_groups", "fp16_groups"):      # DeepSpeed ZeRO-1/2, ZeRO-3: the module parameters per group
        if hasattr(opt, attr):
            return {id(p) for group in getattr(opt, attr) for p in group}
    return {id(p) for g in opt.param_groups for p in g["params"]}


def full_grads(accelerator, parameters):
    """name -> full gradient of each of `parameters` that holds one on this rank as a tensor (DDP: the all-reduced
    gradient; FSDP2: the sharded one, gathered, a collective every rank joins). Empty under DeepSpeed, whose
    gradients live in its own partitioned buffers and whose step has already run when train.py asks for the norm."""
    names = {id(p): n for n, p in accelerator.unwrap_model(accelerator._models[-1]).named_parameters()}
    out = {}
    for p in parameters:
        if p.grad is not None:
            g = p.grad.detach()
            out[names[id(p)]] = (g.full_tensor() if hasattr(g, "full_tensor") else g).float().clone()
    return out


def record(accelerator, model, where, norms=(), grads=None):
    """Per-rank dump at the end of a stage: parameters (safetensors) + what trains and what the optimizer holds,
    every step's gradient norm and (if any) the first step's gradients."""
    from safetensors.torch import save_file
    raw = accelerator.unwrap_model(model)
    params = full_params(accelerator, model)
    in_opt = optimizer_param_ids(accelerator)
    ds = accelerator.state.deepspeed_plugin
    info = {"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
            "process_index": accelerator.process_index, "wrapper": type(model).__name__,
            "zero_stage": ds.zero_stage if ds is not None else None,
            "optimizer": type(getattr(accelerator._optimizers[-1].optimizer, "optimizer", None)).__name__,
            "trainable": sorted(n for n, p in raw.named_parameters() if p.requires_grad),
            "in_optimizer": sorted(n for n, p in raw.named_parameters() if id(p) in in_opt),
            "grad_norms": list(norms)}
    os.makedirs(os.path.dirname(where), exist_ok=True)
    save_file({n: v.contiguous() for n, v in params.items()}, where + ".safetensors")
    if grads:
        save_file({n: v.contiguous() for n, v in grads.items()}, where + ".grads.safetensors")
    with open(where + ".json", "w") as f:
        json.dump(info, f, indent=1)


class Recorder:
    """Patches train.train_stage (to know the stage), Accelerator.clip_grad_norm_ (train.py calls it once per
    optimizer step, clipping or not: the gradients before clipping and the norm it returns, the one the log prints)
    and train.final_state (to dump at the end of the stage)."""

    def __init__(self, job_dir):
        self.job_dir, self.stage_dir, self.norms, self.grads = job_dir, None, [], None

    def __enter__(self):
        import accelerate
        import train
        self.train, self.accelerator_cls = train, accelerate.Accelerator
        self.real_stage, self.real_final = train.train_stage, train.final_state
        self.real_clip = self.accelerator_cls.clip_grad_norm_

        def train_stage(cfg, accelerator, init, stage_dir):
            self.stage_dir, self.norms, self.grads = stage_dir, [], None
            return self.real_stage(cfg, accelerator, init, stage_dir)

        def clip_grad_norm_(acc, parameters, *args, **kwargs):
            parameters = list(parameters)
            if self.grads is None:   # the stage's first step (a resumed stage: its first step in this run)
                self.grads = full_grads(acc, parameters)
            norm = self.real_clip(acc, parameters, *args, **kwargs)
            self.norms.append(None if norm is None else float(norm))
            return norm

        def final_state(acc, model, raw):
            name = os.path.basename(self.stage_dir)
            record(acc, model, os.path.join(self.job_dir, f"rank{acc.process_index}", name), self.norms, self.grads)
            return self.real_final(acc, model, raw)
        train.train_stage, train.final_state = train_stage, final_state
        self.accelerator_cls.clip_grad_norm_ = clip_grad_norm_
        return self

    def __exit__(self, *exc):
        self.train.train_stage, self.train.final_state = self.real_stage, self.real_final
        self.accelerator_cls.clip_grad_norm_ = self.real_clip


# ----------------------------------------------------------------------------- test-only hooks
def ddp_keep_local_hook(state, bucket):
    """DDP comm hook for the desynced rank: its gradient still goes into the all-reduce the peers wait on, but it
    keeps its own local gradient, as if its sync were off."""
    import torch.distributed as dist
    buf = bucket.buffer()
    local = buf.clone()
    fut = dist.all_reduce(buf.div_(dist.get_world_size()), async_op=True).get_future()
    return fut.then(lambda _: local)


def install_desync(desync_rank):
    """Returns an undo function. Patches Accelerator.prepare so the prepared model of every stage gets the hook."""
    import accelerate
    real_prepare = accelerate.Accelerator.prepare
    undo = [lambda: setattr(accelerate.Accelerator, "prepare", real_prepare)]

    def prepare(acc, *args, **kw):
        out = real_prepare(acc, *args, **kw)
        if acc.process_index != desync_rank:
            return out
        for obj in out if isinstance(out, (tuple, list)) else (out,):   # FSDP2 returns a list
            if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
                obj.register_comm_hook(None, ddp_keep_local_hook)
            if isinstance(obj, torch.nn.Module):
                from torch.distributed.fsdp import FSDPModule
                for m in obj.modules():
                    if isinstance(m, FSDPModule):
                        m.set_custom_reduce_scatter(keep_local_reduce_scatter())
        return out
    accelerate.Accelerator.prepare = prepare

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true" and rank() == desync_rank:
        import deepspeed.comm as dscomm
        from deepspeed.runtime.engine import DeepSpeedEngine
        real_backward = DeepSpeedEngine.backward

        def keep_local(fn, out_name):   # the collective runs (peers get their result); our output keeps its input
            def wrapped(*a, **kw):
                out = kw[out_name] if out_name in kw else a[0]
                local = out.clone()
                res = fn(*a, **kw)
                if res is not None and hasattr(res, "wait"):
                    res.wait()
                out.copy_(local)
                return res
            return wrapped

        def backward(engine, *a, **kw):   # only the gradient reductions of backward; the step's norm stays global
            names = {"all_reduce": "tensor", "reduce": "tensor", "reduce_scatter_fn": "output_tensor",
                     "reduce_scatter_tensor": "output_tensor"}   # ZeRO-2: all_reduce / reduce; ZeRO-3: reduce_scatter
            real = {n: getattr(dscomm, n) for n in names}
            for n, arg in names.items():
                setattr(dscomm, n, keep_local(real[n], arg))
            try:
                return real_backward(engine, *a, **kw)
            finally:
                for n, f in real.items():
                    setattr(dscomm, n, f)
        DeepSpeedEngine.backward = backward
        undo.append(lambda: setattr(DeepSpeedEngine, "backward", real_backward))
    return lambda: [u() for u in undo]


def keep_local_reduce_scatter():
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class KeepLocal(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            work = super().__call__(output_tensor, input_tensor, group, op, async_op=False)
            n = output_tensor.numel()
            output_tensor.copy_(input_tensor.view(-1)[group.rank() * n:(group.rank() + 1) * n].view_as(output_tensor))
            return work
    return KeepLocal()


def install_kill(stage, step):
    import train
    real = train.save_checkpoint

    def save_checkpoint(accelerator, work_dir, s, cfg, *args):
        real(accelerator, work_dir, s, cfg, *args)   # ends with wait_for_everyone: every rank's files are written
        if cfg["stage"] == stage and s == step:
            print(f"dist_worker: killing rank {accelerator.process_index} after the step-{s} checkpoint", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    train.save_checkpoint = save_checkpoint
    return lambda: setattr(train, "save_checkpoint", real)


def install_fsdp_cpu():
    """FSDP2 on CPU processes through Accelerate (cpu_feasibility.md §3): plugin from the launcher's FSDP_* env,
    Accelerator(cpu=True) for gloo, then PartialState and AcceleratorState both set to FSDP."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class CpuFsdpAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            plugin = FullyShardedDataParallelPlugin()            # reads FSDP_* set by accelerate launch
            plugin.sync_module_states = False                     # asks for a device; every rank loads the same weights
            plugin.cpu_ram_efficient_loading = False
            super().__init__(*args, cpu=True, fsdp_plugin=plugin, **kwargs)
            PartialState().distributed_type = DistributedType.FSDP
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = plugin
    accelerate.Accelerator = CpuFsdpAccelerator


def main(plan_path):
    with open(plan_path) as f:
        plan = json.load(f)
    os.makedirs(plan["out"], exist_ok=True)
    log = os.open(os.path.join(plan["out"], f"rank{rank()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        # DeepSpeed's CPU backend JIT-builds a shared-memory op with g++ at init (~30 s on a fresh machine); it only
        # serves inference_all_reduce (tensor-parallel inference), never training collectives.
        import deepspeed.comm.torch as dstorch
        dstorch.build_shm_op = lambda: None
    if plan.get("fsdp_cpu"):
        install_fsdp_cpu()
    import accelerate
    import train
    # train.main ends with end_training, which destroys the process group: keep it for the next job
    real_end = accelerate.Accelerator.end_training
    accelerate.Accelerator.end_training = lambda self: [t.finish() for t in self.trackers]
    for job in plan["jobs"]:
        job_dir = os.path.join(plan["out"], job["name"])
        print(f"dist_worker: job {job['name']}", flush=True)
        undo = []
        if job.get("desync_rank") is not None:
            undo.append(install_desync(job["desync_rank"]))
        if job.get("kill_after"):
            undo.append(install_kill(*job["kill_after"]))
        result = {}
        try:
            with Recorder(job_dir):
                result["final"], result["losses"] = train.main(job["argv"])
        except Exception as e:   # a job that must fail: every rank raises at the same point
            if not job.get("expect_error"):
                raise
            result["error"] = f"{type(e).__name__}: {e}"
        os.makedirs(os.path.join(job_dir, f"rank{rank()}"), exist_ok=True)
        with open(os.path.join(job_dir, f"rank{rank()}", "result.json"), "w") as f:
            json.dump(result, f)
        for u in undo:
            u()
    accelerate.Accelerator.end_training = real_end
    from accelerate.state import PartialState
    PartialState().destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

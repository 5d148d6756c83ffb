"""Test-only: run train.py's main and SIGKILL this process in the middle of writing the checkpoint of step
KILL_SAVE_STEP (at its first torch.save into step_N.tmp: the model is written, the optimizer is not, nothing is
renamed yet). Used by tests/test_reliability.py; the library never imports it.

    KILL_SAVE_STEP=4 python tests/kill_worker.py <train.py arguments>
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train  # noqa: E402

target, real_save = f"step_{int(os.environ['KILL_SAVE_STEP']):08d}.tmp", torch.save


def save(obj, f, *args, **kwargs):
    if target in str(f):
        print(f"kill_worker: SIGKILL while writing {f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save
train.main(sys.argv[1:])

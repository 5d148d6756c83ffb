"""evaluate.py as 2 CPU processes over gloo, launched as the README says: each process answers every 2nd question
into its own shard, rank 0 merges them in question order and scores once. The answer files are byte-identical to
one process's (answer_id is named by the settings and the row, not drawn at random), also for a run that was
interrupted with rows in the merged file and in a shard (its last line half-written): the resumed run answers only
the rest. About 10 s per launch on 2 cores."""
import json
import os
import shutil
import socket
import subprocess
import sys

import evaluate
from test_evaluate import setup  # noqa: F401 (the tiny model and benchmark fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = ["pope", "mme", "custom"]   # MME: two questions per question_id; custom: a text-only question


def launch(args, cpu_env=True):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... evaluate.py args`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", **({"ACCELERATE_USE_CPU": "1"} if cpu_env else {}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, "evaluate.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_two_processes_write_what_one_writes_and_resume_a_cut_shard(setup, tmp_path):
    model, data, _ = setup
    args = ["--model", model, "--data", data, "--bench", ",".join(BENCHES), "--max-new-tokens", "5"]
    one = {r["bench"]: r for r in evaluate.main(args + ["--out", str(tmp_path / "one")])}
    two = tmp_path / "two"
    two.mkdir()
    # POPE as an interrupted 2-process run leaves it: 2 rows merged before, rank 1's shard with one complete row and
    # one half-written (its settings file is written before any answer)
    rows = (tmp_path / "one" / "pope_answers.jsonl").read_text().splitlines(keepends=True)
    (two / "pope_answers.jsonl").write_text(rows[0] + rows[2])
    (two / "pope_answers.rank1.jsonl").write_text(rows[3] + rows[5][:40])
    shutil.copy(tmp_path / "one" / "pope_answers.settings.json", two)
    done = launch(args + ["--out", str(two), "--batch-size", "2"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "float32, 2 process(es)" in done.stdout and done.stdout.count("benchmark  split") == 1   # rank 0 only
    for bench in BENCHES:
        name = one[bench]["name"]   # the benchmark's own, or custom-<set>-<hash>
        assert (two / f"{name}_answers.jsonl").read_bytes() == (tmp_path / "one" / f"{name}_answers.jsonl"
                                                                ).read_bytes(), bench
        result = json.loads((two / f"{name}_results.json").read_text())
        assert result["metrics"] == one[bench]["metrics"] and result["count"] == one[bench]["count"]
        assert result["reused"] == (3 if bench == "pope" else 0)   # the half-written row was answered again
    assert not list(two.glob("*.rank*.jsonl"))   # merged and removed


def test_a_launch_whose_processes_run_alone_is_refused(setup, tmp_path):
    """Without ACCELERATE_USE_CPU=1 a GPU-less `--multi_gpu` launch starts 2 processes that each see 1 (the README's
    silent failure): both would answer everything into the same files."""
    model, data, _ = setup
    done = launch(["--model", model, "--data", data, "--bench", "pope", "--out", str(tmp_path)], cpu_env=False)
    assert done.returncode != 0 and "launched as 2 processes, but Accelerate runs each alone" in done.stderr
    assert not (tmp_path / "pope_answers.jsonl").exists()

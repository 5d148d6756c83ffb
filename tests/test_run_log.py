"""What a run says while it trains (issue #24): every logged step's numbers in the trackers and in metrics.jsonl
(carried across a resume), the MFU against the whole job's peak (2 processes: the formula, not a timing), a tracker
that cannot start stopping the run in one line before any model is built, loss.png's labelled and log-scaled axis,
no third-party noise on a normal or QLoRA run, and every stage's data checked before the first one trains (a bad
record met in training: one line too)."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import run_train, write_dataset

import flops
import run_log
import train
from recipes import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = "--stages=[{'name': 'finetune', 'tune_llm': 'full', 'tune_vision_tower': 'frozen'}]"
NUMBERS = {"epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu_percent", "elapsed_s", "samples",
           "tokens", "flops"}
NOISE = ("warn", "removed shared tensor", "loading weights", "failed to load", "traceback")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


def args(tiny_llms, tiny_towers, dataset, out, *extra, llm=None):
    data, images = dataset
    return [f"--llm={llm or tiny_llms['llama']}", f"--vision_tower={tiny_towers['siglip']}", "--template=llama",
            f"--data_finetune={data}", f"--images_finetune={images}", f"--data_pretrain={data}",
            f"--images_pretrain={images}", f"--out_dir={out}", "--bf16=false", "--num_workers=0", "--warmup_ratio=0",
            "--lr=1e-3", "--max_length=256", "--peak_flops=1e10", "--threads=1", *extra]


run = run_train


def rows(stage_dir):
    return run_log.read_metrics(os.path.join(stage_dir, run_log.METRICS))


def noise(text):
    return [line for line in text.splitlines() if any(n in line.lower() for n in NOISE)]


# ----------------------------------------------------------------------------- trackers and metrics.jsonl
class Recording:
    """A tracker registered with Accelerate under its own name (what --tracker=recording reaches)."""
    runs, fail = [], False

    @classmethod
    def tracker_class(cls):
        from accelerate.tracking import GeneralTracker

        class RecordingTracker(GeneralTracker):
            name, requires_logging_directory = "recording", False

            def __init__(self, run_name, **kwargs):
                if cls.fail:
                    raise RuntimeError("no API key found")
                super().__init__()
                self.config, self.logged = None, []
                cls.runs.append(self)

            @property
            def tracker(self):
                return self

            def store_init_configuration(self, values):
                self.config = values

            def log(self, values, step=None, **kwargs):
                self.logged.append((step, dict(values)))
        return RecordingTracker


@pytest.fixture
def recording(monkeypatch):
    from accelerate import tracking
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "recording", Recording.tracker_class())
    Recording.runs, Recording.fail = [], False
    return Recording


def test_trackers_and_metrics_jsonl_get_every_number_of_every_logged_step(tiny_llms, tiny_towers, dataset, tmp_path,
                                                                          recording):
    """loss, lr, grad norm, samples/s, tokens/s, MFU, epoch, elapsed time (and the totals) per logged step, under
    <stage>/ over one step count; metrics.jsonl holds the same rows, their losses losses.json's; losses.json stays
    a list of numbers."""
    out = tmp_path / "run"
    run(args(tiny_llms, tiny_towers, dataset, out, "--tracker=recording", "--micro_batch_size=2",
             "--pretrain.global_batch_size=4", "--finetune.global_batch_size=4", "--max_steps=3", "--log_every=1"))
    (tracker,) = recording.runs
    assert tracker.config["tracker"] == "recording"
    assert [s for s, _ in tracker.logged] == [1, 2, 3, 4, 5, 6]
    for (s, values), stage in zip(tracker.logged, ["pretrain"] * 3 + ["finetune"] * 3):
        assert set(values) == {f"{stage}/{n}" for n in NUMBERS}, values
    for n, stage in ((1, "pretrain"), (2, "finetune")):
        got, losses = rows(out / f"{n}_{stage}"), json.load(open(out / f"{n}_{stage}" / "losses.json"))
        assert [r["step"] for r in got] == [1, 2, 3] and all(set(r) == NUMBERS | {"step"} for r in got)
        assert [r["loss"] for r in got] == losses and all(isinstance(x, float) for x in losses)
        assert [r["samples"] for r in got] == [4, 8, 12] and [r["epoch"] for r in got] == [0.2, 0.4, 0.6]
        assert all(r["elapsed_s"] > 0 and r["grad_norm"] > 0 and 0 < r["mfu_percent"] for r in got)
        logged = {k.split("/")[1]: v for k, v in tracker.logged[3 * (n - 1) + 2][1].items()}
        assert logged == {k: v for k, v in got[-1].items() if k != "step"}


def test_metrics_jsonl_runs_on_across_a_resume(tiny_llms, tiny_towers, dataset, tmp_path, monkeypatch):
    """A run killed in the save of step 4 (its row written) resumes from step 2: the rows after it are dropped and
    written again, once each; the totals (samples, elapsed time) run on from the kept row."""
    out, real = tmp_path / "run", train.save_checkpoint
    argv = args(tiny_llms, tiny_towers, dataset, out, FINETUNE, "--global_batch_size=4", "--micro_batch_size=2",
                "--max_steps=6", "--save_every=2", "--log_every=3")

    def killed(accelerator, work_dir, step, *rest):
        if step == 4:
            raise KeyboardInterrupt
        real(accelerator, work_dir, step, *rest)
    monkeypatch.setattr(train, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run(argv)
    assert [r["step"] for r in rows(out / "1_finetune.partial")] == [2, 3, 4]   # log_every 3, and each save's step
    monkeypatch.setattr(train, "save_checkpoint", real)
    run(argv + ["--resume"])
    got = rows(out / "1_finetune")
    assert [r["step"] for r in got] == [2, 3, 4, 6]
    assert [r["samples"] for r in got] == [8, 12, 16, 24]
    assert all(a["elapsed_s"] < b["elapsed_s"] for a, b in zip(got, got[1:]))
    losses = json.load(open(out / "1_finetune" / "losses.json"))
    assert [r["loss"] for r in got] == [losses[1], losses[2], losses[3], losses[5]]


def test_a_tracker_that_cannot_start_stops_the_run_at_start_up_in_one_line(tiny_llms, tiny_towers, dataset, tmp_path,
                                                                          monkeypatch, recording):
    import model
    monkeypatch.setattr(model, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    from accelerate.tracking import get_available_trackers
    missing = next(t for t in ("mlflow", "wandb", "aim") if t not in {str(x) for x in get_available_trackers()})
    with pytest.raises(ConfigError, match=rf"^--tracker={missing}: the {missing} package is not installed: pip "
                                          rf"install {missing} \(or leave --tracker empty to train untracked\)$"):
        run(args(tiny_llms, tiny_towers, dataset, tmp_path / "a", f"--tracker={missing}"))
    with pytest.raises(ConfigError, match=r"^--tracker=tensorbord: unknown tracker; valid: aim, .*tensorboard"):
        run(args(tiny_llms, tiny_towers, dataset, tmp_path / "b", "--tracker=tensorbord"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()   # refused before out_dir was touched
    recording.fail = True   # installed, but fails to start (no login, no server)
    with pytest.raises(ConfigError, match=r"^--tracker=recording: could not start: RuntimeError: no API key found$"):
        run(args(tiny_llms, tiny_towers, dataset, tmp_path / "c", "--tracker=recording"))
    assert os.listdir(tmp_path / "c") == ["tinyllava_run.json"]
    # the command line: one line on stderr, exit status 2
    p = subprocess.run([sys.executable, "train.py", *args(tiny_llms, tiny_towers, dataset, tmp_path / "d",
                                                          f"--tracker={missing}")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"train.py: error: --tracker={missing}: the {missing} package is not installed: pip install {missing} (or "
        "leave --tracker empty to train untracked)"]


# ----------------------------------------------------------------------------- MFU against the whole job's peak
def test_mfu_divides_by_processes_times_one_processs_share_of_its_machine(monkeypatch, tmp_path):
    assert flops.mfu(3e12, 2.0, 1e11, 2) == pytest.approx(3e12 / 2.0 / 2e11)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(flops, "CORES", 4)
    seen = []
    monkeypatch.setattr(flops, "matmul_peak", lambda *a, **k: seen.append(torch.get_num_threads()) or
                        10e9 * torch.get_num_threads())
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    assert flops.process_peak(torch.float32, cpu, 1, 1) == 10e9                  # 1 process of 1 thread: a core
    assert flops.process_peak(torch.float32, cpu, 1, 2) == 10e9 and seen[-1] == 2   # 2 of 1: the 2-core peak / 2
    assert flops.process_peak(torch.float32, cpu, 2, 4) == 10e9 and seen[-1] == 4   # 4 of 2 on 4 cores: 4 / 4
    assert flops.process_peak(torch.float32, cpu, 4, 2) == 20e9 and len(seen) == 3  # 2 of 4 on 4 cores: cached
    assert torch.get_num_threads() == threads   # a measurement leaves the process's threads as they were


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_processes_log_mfu_against_the_whole_jobs_peak(tiny_llms, tiny_towers, dataset, tmp_path):
    """The 2-process run's model FLOPs, samples and tokens per step are the whole job's: equal to one process's on
    the same global batches; its MFU divides them by 2 x --peak_flops (so not ~2x one process's at the same
    throughput); the log line says so, and nothing else is printed that a normal run should not print."""
    common = [FINETUNE, "--global_batch_size=4", "--max_steps=3", "--log_every=1"]
    run(args(tiny_llms, tiny_towers, dataset, tmp_path / "one", *common, "--micro_batch_size=4"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(ACCELERATE_USE_CPU="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", free_port(), "train.py",
                        *args(tiny_llms, tiny_towers, dataset, tmp_path / "two", *common, "--micro_batch_size=2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = rows(tmp_path / "one" / "1_finetune"), rows(tmp_path / "two" / "1_finetune")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert (a["samples"], a["tokens"]) == (b["samples"], b["tokens"])
        assert b["flops"] == pytest.approx(a["flops"], rel=1e-6)
        assert a["mfu_percent"] == pytest.approx(100 * a["flops"] / a["elapsed_s"] / 1e10, rel=1e-6)
        assert b["mfu_percent"] == pytest.approx(100 * b["flops"] / b["elapsed_s"] / (2 * 1e10), rel=1e-6)
        assert f"| MFU {b['mfu_percent']:.1f}%" in p.stdout
    assert "peak 10 GFLOP/s per process x 2 processes" in p.stdout
    assert noise(p.stdout + p.stderr) == []


# ----------------------------------------------------------------------------- loss.png
def test_loss_png_axis_is_labelled_and_log_where_the_loss_spans_decades(tmp_path):
    assert run_log.loss_axis(0.02, 6.3) == (True, [0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10])
    assert run_log.loss_axis(1.85, 2.34) == (False, [1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4])
    assert run_log.loss_axis(0.5, 4.9) == (False, [0, 1, 2, 3, 4, 5])   # under a decade: linear
    assert run_log.loss_axis(6.5, 6.5) == (False, [5.5, 6, 6.5, 7, 7.5])   # a flat line: a band around it
    assert run_log.loss_axis(3e-5, 8.0) == (True, [1e-5, 1e-4, 1e-3, 0.01, 0.1, 1, 10])   # many decades: 10^k only
    assert [run_log.tick_label(t) for t in (0.05, 1.0, 2.5, 1e-5)] == ["0.05", "1", "2.5", "1e-05"]
    from PIL import Image
    losses = [6.0 * 0.97 ** i + 0.02 for i in range(300)] + [float("nan")]
    run_log.plot_losses(losses, tmp_path / "loss.png", "stage finetune")
    img = Image.open(tmp_path / "loss.png").convert("L")
    assert img.size == (640, 360)
    dark = lambda box: sum(img.crop(box).histogram()[:128])  # noqa: E731
    assert dark((0, 40, 60, 320)) > 100 and dark((60, 320, 640, 345)) > 50   # tick labels along both axes


# ----------------------------------------------------------------------------- noise
@pytest.fixture(scope="module")
def tied_llm(tiny_llms, tmp_path_factory):
    """The tiny Llama with its head tied to its embedding (the demo's LLM, Gemma, Qwen2-0.5B)."""
    from transformers import AutoConfig, LlamaForCausalLM
    from tiny_tokenizers import make_tokenizer
    d = str(tmp_path_factory.mktemp("tied"))
    make_tokenizer("llama", d)
    config = AutoConfig.from_pretrained(tiny_llms["llama"])
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    return d


@pytest.mark.parametrize("recipe", ["base", "qlora"])
def test_a_normal_run_prints_no_warning(tiny_llms, tiny_towers, dataset, tied_llm, tmp_path, recipe):
    """Two stages with a checkpoint each step (a tied head: Accelerate's "Removed shared tensor"), and QLoRA
    (bitsandbytes' CPU-kernel message at import, PEFT's deprecated-alias FutureWarning): none of it printed."""
    p = subprocess.run([sys.executable, "train.py",
                        *args(tiny_llms, tiny_towers, dataset, tmp_path / "run", f"--recipe={recipe}", "--lora_r=4",
                              "--lora_alpha=8", "--micro_batch_size=2", "--pretrain.global_batch_size=4",
                              "--finetune.global_batch_size=4", "--max_steps=2", "--save_every=1", llm=tied_llm)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 2/2" in p.stdout and noise(p.stdout + p.stderr) == [], p.stdout + p.stderr


# ----------------------------------------------------------------------------- every stage's data, at start-up
def with_bad_records(dataset, root):
    """The data set plus an image that is not there (found only when read) and an empty answer."""
    data, images = dataset
    records = json.load(open(data))
    records += [{"id": "gone", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                      {"from": "gpt", "value": "A square."}]},
                {"id": "empty", "conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": " "}]}]
    path = os.path.join(root, "bad.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def test_bad_records_in_stage_2_stop_the_run_before_stage_1_trains(tiny_llms, tiny_towers, dataset, tmp_path, capsys):
    bad = with_bad_records(dataset, tmp_path)
    argv = args(tiny_llms, tiny_towers, dataset, tmp_path / "run", f"--data_finetune={bad}", "--micro_batch_size=2",
                "--pretrain.global_batch_size=4", "--finetune.global_batch_size=4", "--max_steps=1")
    with pytest.raises(ConfigError, match=rf"^stage finetune: {re.escape(bad)}: 2 of 22 records bad \(image-missing 1, "
                                          r"empty-turn 1\), listed above; the run stops before training: fix or "
                                          r"remove them, or --bad_samples=skip leaves them out$"):
        run(argv)
    out, err = capsys.readouterr()
    assert not (tmp_path / "run" / "1_pretrain").exists() and not (tmp_path / "run" / "1_pretrain.partial").exists()
    assert "=== stage" not in out
    assert re.search(r"data check, stage pretrain: .*data.json: 20 records, none bad \(\d+\.\d s\)", out), out
    assert f"{bad}: record 20 (id='gone'): cannot read image" in err and "gone.png" in err and "[image-missing]" in err
    assert f"{bad}: record 21 (id='empty'): turn 1 (gpt) is empty [empty-turn]" in err
    # bad_samples=skip: reported, and the run goes on without them
    final, losses = run(argv + ["--bad_samples=skip"])
    out = capsys.readouterr().out
    assert "stage finetune: bad_samples=skip leaves these 2 records out (image-missing 1, empty-turn 1)" in out
    assert len(losses["pretrain"]) == len(losses["finetune"]) == 1


def test_a_bad_record_met_in_training_ends_the_run_in_one_line(tiny_llms, tiny_towers, dataset, tmp_path):
    """check_data_at_start=false, bad_samples=error: the first bad record read (here in a loader worker, which wraps
    it in its traceback) is one line on stderr, exit status 2."""
    bad = with_bad_records(dataset, tmp_path)
    records = json.load(open(bad))[:-1]   # the missing image only: the empty answer is refused at load
    with open(bad, "w") as f:
        json.dump(records, f)
    p = subprocess.run([sys.executable, "train.py",
                        *args(tiny_llms, tiny_towers, dataset, tmp_path / "run", FINETUNE, f"--data_finetune={bad}",
                              "--check_data_at_start=false", "--num_workers=1", "--global_batch_size=3",
                              "--micro_batch_size=3")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr[-3000:]
    assert re.fullmatch(rf"train.py: error: {re.escape(bad)}: record 20 \(id='gone'\): cannot read image .*gone.png: "
                        r".*\[image-missing\]; bad_samples=skip leaves such records out, check_data.py lists them all",
                        p.stderr.strip()), p.stderr

"""A run touches only what it wrote (issue #23): its record has a name no model folder uses, an out_dir holding
someone else's files (a model, another recipe's run) is refused with the names and left as it was, one lock per
out_dir (a killed holder's lock is stale), a data file edited in place stops --resume, a finished stage counts only
when its record validates, Ctrl-C is one line naming what was kept and the command that continues, no temp file
ends up in a finished folder, and a finished stage keeps no optimizer checkpoints unless asked."""
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from accelerate.state import AcceleratorState
from conftest import crash_after_checkpoint, run_train, write_dataset

import checkpoints
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_STAGE = "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture()
def data(tmp_path):
    return write_dataset(str(tmp_path / "data"), n=16, text_only=4)


def args(tiny_llms, tiny_towers, data, out, *extra):
    d, images = data
    return [f"--llm={tiny_llms['llama']}", f"--vision_tower={tiny_towers['siglip']}", "--template=llama",
            f"--data_pretrain={d}", f"--images_pretrain={images}", f"--data_finetune={d}", f"--images_finetune={images}",
            f"--out_dir={out}", "--bf16=false", "--num_workers=0", "--warmup_ratio=0", "--lr=1e-3", "--max_length=256",
            "--peak_flops=1e10", "--threads=1", "--global_batch_size=4", "--micro_batch_size=2", "--max_steps=4",
            "--gradient_checkpointing=false", *extra]


run = run_train


def tree(folder):
    """Every file under folder with its content hash."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# ----------------------------------------------------------------------------- 1: out_dir holds someone else's files
def test_a_model_folder_given_as_out_dir_is_refused_and_left_as_it_was(tiny_llms, tiny_towers, data, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llms["llama"], model)
    before = tree(model)
    for extra in ([], ["--overwrite"], ["--resume"]):
        with pytest.raises(train.ConfigError, match=r"holds files this run did not write \(config\.json, .*"
                                                    r"model\.safetensors, .*Nothing there is touched"):
            run(args(tiny_llms, tiny_towers, data, model, ONE_STAGE, *extra))
        assert tree(model) == before   # not a byte written, no record, no lock left behind
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(model))


def test_a_run_keeps_its_record_apart_and_refuses_another_recipe(tiny_llms, tiny_towers, data, tmp_path, capsys):
    out = tmp_path / "run"
    run(args(tiny_llms, tiny_towers, data, out, ONE_STAGE, "--max_steps=1"))
    assert sorted(os.listdir(out)) == ["1_finetune", "tinyllava_run.json"]   # no config.json beside the stages
    record = json.loads((out / "tinyllava_run.json").read_text())
    assert record["stages"] == ["finetune"] and record["config"]["max_steps"] == 1
    # another recipe (other stages) into the same out_dir: refused with the difference, even with --resume
    two = "--stages=[{'name': 'pretrain', 'template': 'pretrain'}, {'name': 'finetune', 'tune_llm': 'full'}]"
    before = tree(out)
    for extra in ([], ["--resume"]):
        with pytest.raises(train.ConfigError, match=r"holds a run of other stages \(finetune; this command: "
                                                    r"pretrain, finetune\)"):
            run(args(tiny_llms, tiny_towers, data, out, two, "--max_steps=1", *extra))
    assert tree(out) == before
    # --overwrite replaces our own run (its recorded stage folders), and only that
    (out / "train.log").write_text("a shell's redirect: left alone\n")
    run(args(tiny_llms, tiny_towers, data, out, two, "--max_steps=1", "--overwrite"))
    assert "deleting" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["1_pretrain", "2_finetune", "tinyllava_run.json", "train.log"]
    # a file of someone else's beside the run: refused, even with --overwrite, and kept
    (out / "notes.md").write_text("mine")
    with pytest.raises(train.ConfigError, match=r"holds files this run did not write \(notes\.md\)"):
        run(args(tiny_llms, tiny_towers, data, out, two, "--max_steps=1", "--overwrite"))
    assert (out / "notes.md").read_text() == "mine" and (out / "2_finetune").is_dir()


def test_an_earlier_versions_run_is_recognised_by_its_config_json(tiny_llms, tiny_towers, data, tmp_path):
    out = tmp_path / "run"
    run(args(tiny_llms, tiny_towers, data, out, ONE_STAGE, "--max_steps=1"))
    cfg = json.loads((out / "tinyllava_run.json").read_text())["config"]
    (out / "tinyllava_run.json").unlink()
    (out / "config.json").write_text(json.dumps(cfg))   # how ed39f35 recorded a run
    run(args(tiny_llms, tiny_towers, data, out, ONE_STAGE, "--max_steps=1", "--resume"))
    run(args(tiny_llms, tiny_towers, data, out, ONE_STAGE, "--max_steps=1", "--resume"))   # config.json still ours
    assert json.loads((out / "config.json").read_text()) == cfg   # read, never rewritten


# ----------------------------------------------------------------------------- 2: data edited in place
def test_resume_refuses_a_data_file_edited_in_place(tiny_llms, tiny_towers, data, tmp_path, monkeypatch, capsys):
    common = args(tiny_llms, tiny_towers, data, tmp_path / "run", ONE_STAGE, "--save_every=2")
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(common)
    monkeypatch.undo()
    path = data[0]
    records = json.load(open(path))
    os.utime(path, (time.time() + 5, time.time() + 5))   # a new mtime alone is not a change
    with pytest.raises(train.ConfigError, match="max_steps"):   # (it got past the data check)
        run(common + ["--resume", "--max_steps=5"])
    with open(path, "w") as f:
        json.dump(records[:12], f)   # fewer records, same path
    with pytest.raises(train.ConfigError, match=rf"the data changed since .*step_00000002.*data_finetune {path}: "
                                                r"\d+ -> \d+ bytes.*--resume_allow=data"):
        run(common + ["--resume"])
    with open(path, "w") as f:   # same size, other content
        json.dump(records[::-1], f)
    with pytest.raises(train.ConfigError, match="same size, other content"):
        run(common + ["--resume"])
    capsys.readouterr()
    _, resumed = run(common + ["--resume", "--resume_allow=data"])
    assert len(resumed["finetune"]) == 2 and "--resume_allow=data: changed since" in capsys.readouterr().out
    saved = json.load(open(tmp_path / "run" / "1_finetune" / "train_config.json"))["data_files"]["data_finetune"]
    assert saved["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()


# ----------------------------------------------------------------------------- 4: one lock per out_dir
HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import checkpoints
checkpoints.RunLock({out!r}).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_stale(tiny_llms, tiny_towers, data,
                                                                                tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=str(out))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(train.ConfigError, match=rf"run is in use by another run \(pid {holder.pid} on "
                                                    r".*, started 20\d\d-.*wait for it to end, or use another"):
            run(args(tiny_llms, tiny_towers, data, out, ONE_STAGE, "--max_steps=1"))
        assert sorted(os.listdir(out)) == ["tinyllava_run.lock"]   # nothing written beside the holder's lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(out / "tinyllava_run.lock")   # left by the killed holder: stale, taken over
    run(args(tiny_llms, tiny_towers, data, out, ONE_STAGE, "--max_steps=1"))
    assert sorted(os.listdir(out)) == ["1_finetune", "tinyllava_run.json"]   # released at the end


def test_two_trainings_started_together_one_is_refused(tiny_llms, tiny_towers, data, tmp_path):
    """As the issue found it: two real processes 0.5 s apart into one out_dir."""
    cmd = [sys.executable, "train.py", *args(tiny_llms, tiny_towers, data, tmp_path / "run", ONE_STAGE,
                                             "--max_steps=8", "--save_every=1")]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "run" / "tinyllava_run.json") and time.time() < deadline:
        time.sleep(0.2)   # the first holds the lock (its record is written under it)
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert second.stderr.count("\n") == 1 and f"is in use by another run (pid {first.pid} on" in second.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["1_finetune", "tinyllava_run.json"]


# ----------------------------------------------------------------------------- 9: a finished stage's record
@pytest.mark.parametrize("record,match", [
    ("{}", r"not a valid stage record \(\d+ settings missing or of the wrong type: stage missing"),
    ("[]", "not a stage record .* but list"),
    ('"x"', "not a stage record .* but str"),
    ("null", "not a stage record .* but NoneType"),
    ("{not json", "cannot read the finished stage's settings"),
    ("lr=str", r"not a valid stage record \(1 settings .*: lr='0.001'"),
    ("no losses", r"losses\.json: cannot read the finished stage's losses"),
    ("losses=dict", r"losses\.json: not a list of numbers")])
def test_a_finished_stage_counts_only_when_its_record_validates(record, match, tiny_llms, tiny_towers, data, tmp_path,
                                                                 monkeypatch):
    common = args(tiny_llms, tiny_towers, data, tmp_path / "run", ONE_STAGE, "--max_steps=1")
    run(common)
    stage = tmp_path / "run" / "1_finetune"
    good = json.loads((stage / "train_config.json").read_text())
    if record == "lr=str":
        (stage / "train_config.json").write_text(json.dumps({**good, "lr": "0.001"}))
    elif record == "no losses":
        (stage / "losses.json").unlink()
    elif record == "losses=dict":
        (stage / "losses.json").write_text('{"a": 1}')
    else:
        (stage / "train_config.json").write_text(record)
    monkeypatch.setattr(train, "train_stage", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(train.ConfigError, match=match) as e:
        run(common + ["--resume"])
    assert str(stage) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- 10, 11: Ctrl-C, temp files, checkpoints
def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_naming_what_was_kept_and_the_command_that_continues(tiny_llms, tiny_towers, data,
                                                                                 tmp_path):
    out = tmp_path / "run"
    # Ctrl-C's default disposition in the child, whatever the tests were started with: a shell without job control
    # starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt (the run goes on)
    argv = args(tiny_llms, tiny_towers, data, out, ONE_STAGE, "--max_steps=400", "--save_every=1")
    p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 180
    while checkpoints.latest_checkpoint(str(out / "1_finetune.partial")) is None and time.time() < deadline:
        assert p.poll() is None, f"train.py ended (rc {p.returncode}) before a checkpoint was seen"
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    line, = err.strip().splitlines()
    kept = checkpoints.latest_checkpoint(str(out / "1_finetune.partial"))
    assert line.startswith(f"train.py: interrupted; kept {kept}; continue with: python train.py ")
    again = shlex.split(line.split("continue with: ")[1])   # quoted for a shell: pasted back, it resumes
    assert again == ["python", "train.py", *argv, "--resume"]
    assert not os.path.exists(out / "tinyllava_run.lock")   # released on the way out
    # before any checkpoint: says that nothing was kept
    p = subprocess.Popen([sys.executable, "train.py", *args(tiny_llms, tiny_towers, data, tmp_path / "r2", ONE_STAGE,
                                                            "--max_steps=400")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    while not os.path.exists(tmp_path / "r2" / "tinyllava_run.json") and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines() == [
        "train.py: interrupted before the first checkpoint, nothing kept (a checkpoint is written every save_every "
        "steps); run the command again"], err[-3000:]


def test_no_temp_file_in_a_finished_folder_and_no_checkpoints_unless_asked(tiny_llms, tiny_towers, data, tmp_path,
                                                                          monkeypatch):
    common = args(tiny_llms, tiny_towers, data, tmp_path / "run", ONE_STAGE, "--save_every=2")
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(common)
    monkeypatch.undo()
    work = tmp_path / "run" / "1_finetune.partial"
    (work / "config.json.4242.tmp").write_text("{")   # what Ctrl-C during a final save's write left behind
    run(common + ["--resume"])
    stage = tmp_path / "run" / "1_finetune"
    assert not [f for f in tree(stage) if f.endswith(".tmp")]
    assert not (stage / "checkpoints").exists()   # keep_checkpoints=0 (default): the finished stage keeps none
    run(args(tiny_llms, tiny_towers, data, tmp_path / "keep", ONE_STAGE, "--save_every=1", "--keep_checkpoints=2"))
    assert sorted(os.listdir(tmp_path / "keep" / "1_finetune" / "checkpoints")) == ["step_00000002", "step_00000003"]


def test_the_demo_saves_checkpoints_and_keeps_none_when_done():
    scope = {}
    exec(open(os.path.join(ROOT, "configs", "demo.py")).read(), scope)
    steps = {s["name"]: s["epochs"] * -(-len(json.load(open(os.path.join(ROOT, scope[f"data_{s['name']}"]))))
                                        // scope["global_batch_size"]) for s in scope["stages"]}
    # a checkpoint at least 4 times per stage (about 30 s apart on the 2-core machine: README), none kept at the end
    assert 0 < scope["save_every"] <= min(steps.values()) / 4 and scope.get("keep_checkpoints", 0) == 0


def test_chat_evaluate_and_convert_name_a_broken_stage_record_in_one_line(tiny_llms, tiny_towers, data, tmp_path):
    """ed39f35: `KeyError: 'template'` (or a TypeError) from each; now one line naming train_config.json."""
    from folders import LoadError, trained_settings
    run(args(tiny_llms, tiny_towers, data, tmp_path / "run", ONE_STAGE, "--max_steps=1"))
    stage = tmp_path / "run" / "1_finetune"
    for record in ("{}", "[]", "null", '{"template": 3}', "{broken"):   # what every loader reads it through
        (stage / "train_config.json").write_text(record)
        with pytest.raises(LoadError, match=rf"^{stage}/train_config.json: (not a stage record|unreadable)"):
            trained_settings(str(stage))
    (stage / "train_config.json").write_text("{}")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "image": "0.png", "text": "What colour?", "category": "c"}))
    commands = {"chat.py": ["--model", stage, "--image", f"{data[1]}/0.png", "--prompt", "What colour?"],
                "evaluate.py": ["--model", stage, "--bench", "custom", "--questions", questions, "--image-folder",
                                data[1], "--out", tmp_path / "eval"],
                "convert.py": ["to-tinyllava", stage, tmp_path / "exported"]}
    for script, argv in commands.items():
        p = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode in (1, 2) and "Traceback" not in p.stderr, (script, p.stderr[-2000:])
        line, = [x for x in p.stderr.splitlines() if x.strip()]
        assert line.startswith(f"{script}: error: {stage}/train_config.json: not a stage record"), (script, line)

"""A crash or a changed command never leaves a run that cannot go on: the final save is atomic (a kill at each point
of it resumes to the uninterrupted result), resume is bit-exact with dropout on, a resume with other settings is
refused with the list (or accepted by name, a new lr taking effect), output folders are resumed, refused or
overwritten before anything is built, and nonsense numbers are refused at startup."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import crash_after_checkpoint, write_dataset

import train
from model import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), n=16, text_only=4)


@pytest.fixture(scope="module")
def dropout_phi(tiny_llms, tmp_path_factory):
    """The tiny Phi with Phi-2's dropout (resid_pdrop 0.1) and embedding dropout on."""
    d = str(tmp_path_factory.mktemp("phi_dropout"))
    shutil.copytree(tiny_llms["phi"], d, dirs_exist_ok=True)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config.update(resid_pdrop=0.1, embd_pdrop=0.1)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    return d


def args(llm, tower, data, out, *extra, template="llama"):
    d, images = data
    return [f"--llm={llm}", f"--vision_tower={tower}", f"--template={template}", f"--data_pretrain={d}",
            f"--images_pretrain={images}", f"--data_finetune={d}", f"--images_finetune={images}", f"--out_dir={out}",
            "--bf16=false", "--num_workers=0", "--warmup_ratio=0", "--lr=1e-3", "--max_length=256",
            "--peak_flops=1e10", "--global_batch_size=4", "--micro_batch_size=2", "--max_steps=6", "--save_every=2",
            *extra]


def run(argv):
    AcceleratorState._reset_state(True)
    try:
        return train.main(argv)
    finally:
        AcceleratorState._reset_state(True)


def weights(stage_dir):
    return load_pretrained(str(stage_dir))[0].state_dict()


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ----------------------------------------------------------------------------- exact resume with dropout
@pytest.mark.parametrize("kind", ["dropout_llm", "lora_dropout"])
def test_resume_is_bit_exact_with_dropout_on(kind, tiny_llms, tiny_towers, dropout_phi, data, tmp_path, monkeypatch):
    if kind == "dropout_llm":   # Phi-2's resid_pdrop 0.1, the whole LLM trained
        extra = [f"--llm={dropout_phi}", "--template=phi", "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]"]
    else:                       # LoRA's default lora_dropout 0.05 on a dropout-free LLM
        extra = ["--stages=[{'name': 'finetune', 'tune_llm': 'lora'}]", "--lora_r=4", "--lora_alpha=8"]
    common = [*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "full"), *extra]
    _, full = run(common)
    losses = full["finetune"]
    # dropout is live: the same step evaluated twice in train mode differs (else this test could not fail)
    assert len(set(losses)) == 6
    crash_after_checkpoint(monkeypatch, 4)
    cut = common + [f"--out_dir={tmp_path / 'cut'}"]
    with pytest.raises(KeyboardInterrupt):
        run(cut)
    monkeypatch.undo()
    _, resumed = run(cut + ["--resume"])
    assert resumed["finetune"] == losses[4:]                              # bit for bit
    assert_same_weights(tmp_path / "full" / "1_finetune", tmp_path / "cut" / "1_finetune")
    # losses.json holds the whole history, the resumed run's included
    with open(tmp_path / "cut" / "1_finetune" / "losses.json") as f:
        assert json.load(f) == losses


# ----------------------------------------------------------------------------- the final save, killed at each point
def kill_points(monkeypatch, point):
    """Install a crash at one point of a stage's end (or just after it)."""
    import model
    real_final, real_spt, real_replace, real_stage = train.final_save, model.save_pretrained, os.replace, train.train_stage

    def die(why):
        raise KeyboardInterrupt(f"killed {why}")
    if point == "before the model":
        monkeypatch.setattr(train, "final_save", lambda *a, **k: die(point))
    elif point == "after the weights":
        def spt(*a, **k):
            real_spt(*a, **k)
            die(point)   # model.safetensors, config.json, tokenizer written; train_config.json not
        monkeypatch.setattr(model, "save_pretrained", spt)
    elif point == "before the rename":
        def replace(src, dst, *a, **k):
            if str(src).endswith(".partial"):
                die(point)
            return real_replace(src, dst, *a, **k)
        monkeypatch.setattr(os, "replace", replace)
    elif point == "after the rename":
        def stage(cfg, *a):
            if cfg["stage"] == "finetune":
                die(point)
            return real_stage(cfg, *a)
        monkeypatch.setattr(train, "train_stage", stage)


@pytest.mark.parametrize("point", ["before the model", "after the weights", "before the rename", "after the rename"])
def test_a_kill_at_any_point_of_the_final_save_resumes_to_the_same_model(point, tiny_llms, tiny_towers, data,
                                                                         tmp_path, monkeypatch):
    stages = "--stages=[{'name': 'pretrain'}, {'name': 'finetune', 'tune_llm': 'full'}]"
    common = [*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "full"), stages, "--max_steps=3"]
    run(common)
    cut = common + [f"--out_dir={tmp_path / 'cut'}"]
    kill_points(monkeypatch, point)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        run(cut)
    monkeypatch.undo()
    if point != "after the rename":   # the stage folder exists only when complete
        assert not os.path.exists(tmp_path / "cut" / "1_pretrain")
        with pytest.raises(train.ConfigError, match="already holds a run"):
            run(cut)                  # without --resume: refused, nothing touched
    else:
        assert train.finished(str(tmp_path / "cut" / "1_pretrain"))
    final, resumed = run(cut + ["--resume"])
    assert list(resumed) == (["finetune"] if point == "after the rename" else ["pretrain", "finetune"])
    for stage in ("1_pretrain", "2_finetune"):
        assert_same_weights(tmp_path / "full" / stage, tmp_path / "cut" / stage)
        assert not os.path.exists(tmp_path / "cut" / f"{stage}.partial")


# ----------------------------------------------------------------------------- changed settings on resume
@pytest.fixture
def cut_run(tiny_llms, tiny_towers, data, tmp_path, monkeypatch):
    """A run killed after step 4's checkpoint (of 6), and its uninterrupted twin's losses."""
    common = [*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "cut"),
              "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]"]
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(common)
    monkeypatch.undo()
    return common, tmp_path / "cut" / "1_finetune.partial" / "checkpoints" / "step_00000004"


def test_changed_settings_are_refused_with_the_list(cut_run):
    common, ckpt = cut_run
    with pytest.raises(train.ConfigError, match=r"made with other settings.*lr 0\.001 -> 0\.0001; "
                                                r"micro_batch_size 2 -> 1; seed 42 -> 1\. .*--resume_allow=lr,"
                                                r"micro_batch_size,seed$"):
        run(common + ["--resume", "--lr=1e-4", "--seed=1", "--micro_batch_size=1"])
    with pytest.raises(train.ConfigError, match="max_steps 6 -> 8"):
        run(common + ["--resume", "--max_steps=8"])
    with pytest.raises(train.ConfigError, match=r"--resume_allow: unknown config key 'learning_rate'"):
        run(common + ["--resume", "--resume_allow=learning_rate"])
    assert sorted(os.listdir(ckpt.parent)) == ["step_00000004"]   # nothing was touched (keep_checkpoints=0: the newest)


def test_an_allowed_new_lr_takes_effect_from_the_resumed_step(cut_run, capsys):
    common, _ = cut_run
    capsys.readouterr()
    _, resumed = run(common + ["--resume", "--lr=1e-4", "--resume_allow=lr"])
    out = capsys.readouterr().out
    assert "--resume_allow: changed since" in out and "lr 0.001 -> 0.0001" in out
    # the log's lr after step 5 of 6 is the new lr on the same cosine: 1e-4 * cos schedule(5 of 6)
    expected = 1e-4 * train.cosine_with_warmup(5, 0, 6)
    assert f"step 5/6 (epoch 1.00) | loss {resumed['finetune'][0]:.4f} | lr {expected:.2e} |" in out


def test_a_missing_or_unreadable_rng_state_is_an_error_unless_allowed(cut_run, capsys):
    common, ckpt = cut_run
    rng = ckpt / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:100])   # truncated
    with pytest.raises(train.ConfigError, match=r"random_states_0\.pkl is missing or unreadable"):
        run(common + ["--resume"])
    rng.unlink()
    with pytest.raises(train.ConfigError, match=r"random_states_0\.pkl is missing or unreadable.*--resume_allow=rng"):
        run(common + ["--resume"])
    _, resumed = run(common + ["--resume", "--resume_allow=rng"])
    assert len(resumed["finetune"]) == 2 and "--resume_allow=rng" in capsys.readouterr().out


def test_another_process_count_is_refused_unless_allowed(cut_run, capsys):
    """trainer.json records how many processes wrote the checkpoint. Resumed under another count (faked here: this
    1-process checkpoint's record says 2, which is all check_resume reads, from plan_output and train_stage; the
    real 2 -> 1 resume: test_distributed.py::test_resume_under_another_process_count) the ranks would read other
    batches, so it is refused by name, even with every other change allowed, and accepted with
    --resume_allow=processes."""
    common, ckpt = cut_run
    path = ckpt / "trainer.json"
    state = json.loads(path.read_text())
    assert state["processes"] == 1
    path.write_text(json.dumps({**state, "processes": 2}))
    for extra in ([], ["--lr=1e-4", "--resume_allow=lr"]):
        with pytest.raises(train.ConfigError, match=r"step_00000004 was made with other settings, so the run would "
                                                    r"not continue exactly: processes 2 -> 1\. .*--resume_allow="
                                                    r"processes$"):
            run(common + ["--resume", *extra])
    assert sorted(os.listdir(ckpt.parent)) == ["step_00000004"]   # nothing was touched
    capsys.readouterr()
    _, resumed = run(common + ["--resume", "--resume_allow=processes"])
    assert len(resumed["finetune"]) == 2 and "--resume_allow: changed since" in capsys.readouterr().out


@pytest.mark.parametrize("record,match", [({"step": -3}, "not a valid checkpoint record"),
                                          ({"step": "4"}, "not a valid checkpoint record"),
                                          ({"step": 60}, "step 60 is beyond this stage's 6 steps"),
                                          (None, "cannot read the checkpoint's step")])
def test_a_corrupt_checkpoint_record_is_refused(cut_run, record, match):
    common, ckpt = cut_run
    path = ckpt / "trainer.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, **record}) if record else path.read_text()[:50])
    with pytest.raises(train.ConfigError, match=match):
        run(common + ["--resume"])


# ----------------------------------------------------------------------------- output folders and numbers
def test_an_existing_run_is_resumed_refused_or_overwritten(tiny_llms, tiny_towers, data, tmp_path, capsys, monkeypatch):
    common = [*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "run"), "--max_steps=2",
              "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]"]
    _, first = run(common)
    built = []
    monkeypatch.setattr(train, "train_stage", lambda *a: built.append(a))
    with pytest.raises(train.ConfigError, match=r"run already holds a run \(1_finetune\): --resume continues it, "
                                                r"--overwrite deletes it"):
        run(common)
    assert built == []                                    # refused before any model was built
    run(common + ["--resume"])
    assert built == [] and "stage finetune already finished" in capsys.readouterr().out
    monkeypatch.undo()
    _, again = run(common + ["--overwrite"])
    assert again["finetune"] == first["finetune"]
    assert "--overwrite: deleting" in capsys.readouterr().out
    with pytest.raises(train.ConfigError, match="--resume and --overwrite contradict"):
        run(common + ["--overwrite", "--resume"])
    _, fresh = run([*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "new"), "--max_steps=2",
                    "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]", "--resume"])
    assert "--resume: nothing to resume in" in capsys.readouterr().out and fresh["finetune"] == first["finetune"]


def test_nonsense_numbers_are_refused_at_startup_all_at_once(tiny_llms, tiny_towers, data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "train_stage", lambda *a: pytest.fail("built a model"))
    bad = ["--max_steps=-1", "--epochs=0", "--micro_batch_size=0", "--log_every=0", "--max_nonfinite_steps=0"]
    with pytest.raises(train.ConfigError) as e:
        run([*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "run"), *bad])
    assert str(e.value).splitlines() == ["--max_steps: expected a whole number >= 0, got '-1'",
                                         "--epochs: expected a whole number >= 1, got '0'",
                                         "--micro_batch_size: expected a whole number >= 1, got '0'",
                                         "--log_every: expected a whole number >= 1, got '0'",
                                         "--max_nonfinite_steps: expected a whole number >= 1, got '0'"]
    with pytest.raises(train.ConfigError, match=r"^--finetune.lr: expected a number >= 0, got '-1'$"):
        run([*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "run"), "--finetune.lr=-1"])
    assert not os.path.exists(tmp_path / "run")


def test_space_separated_values_and_hf_names():
    cfg = train.load_config(["--lr", "1e-4", "--resume", "--finetune.lr", "1e-5", "--seed", "3",
                             "--vision_feature_layer", "-3"])
    assert (cfg["lr"], cfg["resume"], cfg["seed"], cfg["stage_overrides"], cfg["vision_feature_layer"]) == \
        (1e-4, True, 3, {"finetune": {"lr": 1e-5}}, -3)
    for hf, ours in (("learning_rate", "lr"), ("per_device_train_batch_size", "micro_batch_size"),
                     ("gradient_accumulation_steps", "global_batch_size"), ("num_train_epochs", "epochs")):
        with pytest.raises(train.ConfigError, match=f"unknown config key '{hf}'; did you mean {ours}"):
            train.load_config([f"--{hf}=1"])


def test_the_command_line_prints_each_problem_on_one_line_and_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "train.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.splitlines()[0] == ("train.py: error: no model: give --config, or --llm and "
                                                              "--vision_tower (or --init_from)"), p.stderr
    p = subprocess.run([sys.executable, "train.py", "--max_steps", "-1", "--learning_rate=1e-4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == ["train.py: error: --max_steps: expected a whole number >= 0, got '-1'",
                                             "train.py: error: unknown config key 'learning_rate'; did you mean lr?"]
    p = subprocess.run([sys.executable, "train.py", f"--data_finetune={tmp_path}/typo.json", "--micro_batch_size=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "train.py: error: no model: give --config, or --llm and --vision_tower (or --init_from)",
        "train.py: error: stage pretrain: global_batch_size 256 is not micro_batch_size 3 x 1 processes x a whole "
        "number of accumulation steps",
        "train.py: error: stage pretrain: data_pretrain is not set (the data file of this stage)",
        "train.py: error: stage finetune: global_batch_size 128 is not micro_batch_size 3 x 1 processes x a whole "
        "number of accumulation steps",
        f"train.py: error: stage finetune: data_finetune: '{tmp_path}/typo.json' is not a file"], p.stderr


# ----------------------------------------------------------------------------- saves that fail, NaN streaks
def test_a_failed_checkpoint_save_names_the_folder_and_keeps_the_last_good_one(tiny_llms, tiny_towers, data,
                                                                                tmp_path, monkeypatch):
    common = [*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "run"),
              "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]"]
    real = torch.save

    def disk_full(obj, f, *a, **k):   # what torch.save says when the disk fills up mid-file
        if "step_00000004.tmp" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2883648 vs 2883540")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RuntimeError, match=r"could not write the checkpoint of step 4 to .*step_00000004\.tmp "
                                           r"\(\d+ MiB free there\): .*unexpected pos"):
        run(common)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "run" / "1_finetune.partial" / "checkpoints")) == ["step_00000002"]
    _, resumed = run(common + ["--resume"])
    assert len(resumed["finetune"]) == 4


def test_a_nonfinite_stop_points_at_a_checkpoint_from_before_the_streak(tiny_llms, tiny_towers, data, tmp_path,
                                                                         monkeypatch):
    """keep_checkpoints=1 and a checkpoint every step: the streak's steps write none, so the one before survives."""
    from model import TinyLlava
    real, calls = TinyLlava.forward, [0]

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if k.get("labels") is not None and self.training:
            calls[0] += 1
            if calls[0] >= 5:   # steps 3, 4, 5 (2 micro-batches each)
                out = {**out, "loss_sum": out["loss_sum"] * float("nan")}
        return out
    monkeypatch.setattr(TinyLlava, "forward", forward)
    with pytest.raises(RuntimeError, match=r"\(steps 3-5\).*The last checkpoint before step 3: .*step_00000002 "):
        run([*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "run"), "--save_every=1",
             "--keep_checkpoints=1", "--max_nonfinite_steps=3", "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]",
             "--gradient_checkpointing=false"])   # no auto trial step: calls counts the loop's forwards only
    assert os.listdir(tmp_path / "run" / "1_finetune.partial" / "checkpoints") == ["step_00000002"]


def test_an_adapter_only_stage_is_complete_and_resumable(tiny_llms, tiny_towers, data, tmp_path, capsys):
    """QLoRA without a previous stage writes adapters only (no merged model): still a complete, skippable stage."""
    common = [*args(tiny_llms["llama"], tiny_towers["siglip"], data, tmp_path / "run"), "--max_steps=1",
              "--stages=[{'name': 'finetune', 'tune_llm': 'qlora'}]", "--lora_r=4", "--lora_alpha=8"]
    final, _ = run(common)
    assert train.finished(final) and os.path.isfile(os.path.join(final, "adapter_llm", "adapter_config.json"))
    _, again = run(common + ["--resume"])
    assert again == {} and "stage finetune already finished" in capsys.readouterr().out

"""Bad data gets a clear answer, crashes lose nothing: a deliberately broken data set with one record of each kind
of problem (the data check reports each with index and id; bad_samples="skip" leaves out exactly those records and
reports them, "error" stops at the first); NaN injection; SIGKILL mid-save and at a random step, then resume."""
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from transformers import SiglipImageProcessor

import check_data
import train
from conftest import write_dataset
from data import DataError, VLMDataset, collate
from model import load_pretrained
from tiny_tokenizers import make_tokenizer

N_IMG = 4
Q = "What is in the picture?"


def turn(frm, value):
    return {"from": frm, "value": value}


def broken_dataset(root):
    """(path, image folder, {index: expected problem fragment}); records 0, 10 and 11 are fine, 7 only a note."""
    os.makedirs(f"{root}/images", exist_ok=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(f"{root}/images/ok.png")
    with open(f"{root}/images/corrupt.png", "wb") as f:
        f.write(b"\x89PNG not really")
    ok = [turn("human", f"<image>\n{Q}"), turn("gpt", "A cat.")]
    records = [
        {"id": "good", "image": "ok.png", "conversations": ok},
        {"id": "missing", "image": "nope.png", "conversations": ok},
        {"id": "corrupt", "image": "corrupt.png", "conversations": ok},
        {"id": "no-tag", "image": "ok.png", "conversations": [turn("human", Q), turn("gpt", "A cat.")]},
        {"id": "no-image", "conversations": ok},
        {"id": "two-tags", "image": "ok.png", "conversations": [turn("human", f"<image>\n<image>\n{Q}"),
                                                               turn("gpt", "A cat.")]},
        {"id": "not-alternating", "conversations": [turn("human", Q), turn("human", Q), turn("gpt", "A cat.")]},
        {"id": "system-first", "conversations": [turn("system", "Be brief."), turn("human", Q), turn("gpt", "Yes.")]},
        {"id": "gpt-first", "conversations": [turn("gpt", "Hi."), turn("gpt", "A cat.")]},
        {"id": "empty-turn", "conversations": [turn("human", Q), turn("gpt", "  ")]},
        {"id": "text", "conversations": [turn("human", Q), turn("gpt", "A cat.")]},
        {"id": "text2", "conversations": [turn("human", "Why?"), turn("gpt", "Because.")]},
        {"id": "too-long", "image": "ok.png", "conversations": [turn("human", "<image>\n" + " ".join([Q] * 40)),
                                                               turn("gpt", "A cat.")]},
    ]
    with open(f"{root}/data.json", "w") as f:
        json.dump(records, f)
    expected = {1: "cannot read image", 2: "cannot read image", 3: "no <image> in its text", 4: "but no 'image'",
                5: "2 <image> placeholders", 6: "turn 1 is from 'human', expected 'gpt'",
                8: "turn 0 is from 'gpt', expected 'human'", 9: "turn 1 (gpt) is empty",
                12: "answer truncated away at max_length=64"}
    return f"{root}/data.json", f"{root}/images", expected


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer("llama", tmp_path_factory.mktemp("tok"))


def test_the_check_reports_every_problem_with_index_and_id(tok, tmp_path, capsys):
    path, images, expected = broken_dataset(tmp_path)
    tok.save_pretrained(tmp_path / "tok")
    status = check_data.main([path, "--image-folder", images, "--tokenizer", str(tmp_path / "tok"),
                              "--template", "llama", "--num-image-tokens", str(N_IMG), "--max-length", "64"])
    out = capsys.readouterr().out
    assert status == 1
    ids = [r["id"] for r in json.load(open(path))]
    for i, fragment in expected.items():
        lines = [x for x in out.splitlines() if x.startswith(f"{path}: record {i} (id={ids[i]!r}): ")]
        assert lines and fragment in lines[0], (i, fragment, out)
    reported = {int(x.split("record ")[1].split(" ")[0]) for x in out.splitlines() if ": record " in x and
                "): note: " not in x}
    assert reported == set(expected)
    assert f"{path}: record 7 (id='system-first'): note: first message is from 'system': dropped" in out
    assert "13 records (6 with an image, 7 text-only); 9 with problems; 1 with a leading system message" in out
    assert "tokens per sample incl. 4 per image (llama template): p50 " in out


def test_the_check_passes_a_clean_set(tok, tmp_path, capsys):
    path, images, expected = broken_dataset(tmp_path)
    records = [r for i, r in enumerate(json.load(open(path))) if i not in expected]
    report = check_data.check(records, images, tok, "llama", N_IMG, 64)
    assert report["problems"] == [] and len(report["lengths"]) == 4 and report["notes"][0][1] == "system-first"


def dataset(path, images, tok, policy):
    proc = SiglipImageProcessor(size={"height": 16, "width": 16})
    return VLMDataset(path, tok, proc, "llama", N_IMG, 64, images, bad_samples=policy)


def test_skip_policy_leaves_out_exactly_the_bad_records_and_reports_them(tok, tmp_path):
    path, images, expected = broken_dataset(tmp_path)
    with pytest.raises(DataError, match=r"data.json: record 3 \(id='no-tag'\): has 'image' but no <image>"):
        dataset(path, images, tok, "error")
    ds = dataset(path, images, tok, "skip")
    structural = {i for i, _, _ in ds.skipped}
    assert structural == {3, 4, 5, 6, 8, 9}            # found when the set is read
    batch = collate([ds[i] for i in range(len(ds))], tok.unk_token_id)
    at_read = {i for i, _, _ in batch["skipped"]}
    assert at_read == {1, 2, 12}                        # found when a sample is read: replaced, reported
    assert structural | at_read == set(expected)
    assert batch["input_ids"].shape[0] == len(ds) == 13 - 6
    # replacements keep the modality: every image row still has its picture
    assert batch["images"].shape[0] == int((batch["input_ids"] == -200).any(1).sum()) == 4


@pytest.mark.parametrize("tower,connector,extra", [("siglip", "mlp2x_gelu", {}), ("clip", "qformer", {}),
                                                   ("siglip", "pixel_shuffle2_mlp2x_gelu", {}), ("siglip", "linear", {"legacy_patch_drop": True}),
                                                   ("clip", "mof_mlp", {"vision_tower2": "dinov2"})])
def test_image_tokens_counted_from_configs_equal_the_built_model(tiny_llms, tiny_towers, tower, connector, extra):
    from model import ModelArgs, build_model, count_image_tokens
    if "vision_tower2" in extra:
        extra = {"vision_tower2": tiny_towers[extra["vision_tower2"]]}
    args = ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers[tower], connector=connector, num_queries=8,
                     **extra)
    assert count_image_tokens(args) == build_model(args)[0].num_image_tokens


def test_the_check_reads_a_training_config(tiny_llms, tiny_towers, tmp_path, capsys):
    path, images, expected = broken_dataset(tmp_path)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"llm = {tiny_llms['llama']!r}\nvision_tower = {tiny_towers['siglip']!r}\ntemplate = 'llama'\n"
                   f"max_length = 64\ndata_finetune = {path!r}\nimages_finetune = {images!r}\n")
    assert check_data.main([path, "--image-folder", images, "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert f"(stage finetune of {cfg})" in out and "incl. 16 per image (llama template)" in out
    assert "answer truncated away at max_length=64" in out


# ----------------------------------------------------------------------------- training: skip, NaN, SIGKILL
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(tiny_llms, tiny_towers, data, images, out, *extra):
    return [f"--llm={tiny_llms['llama']}", f"--vision_tower={tiny_towers['siglip']}", "--template=llama",
            f"--data_finetune={data}", f"--images_finetune={images}", f"--out_dir={out}", "--bf16=false",
            "--num_workers=0", "--warmup_ratio=0", "--lr=1e-3", "--max_length=256", "--peak_flops=1e10",
            "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]", *extra]


def run_main(args):
    AcceleratorState._reset_state(True)
    try:
        return train.main(args)
    finally:
        AcceleratorState._reset_state(True)


def test_training_skips_and_reports_every_bad_record(tiny_llms, tiny_towers, tmp_path, capsys):
    path, images, expected = broken_dataset(tmp_path)
    args = train_args(tiny_llms, tiny_towers, path, images, tmp_path / "run", "--global_batch_size=2",
                      "--micro_batch_size=2", "--epochs=1", "--max_length=64")   # record 12's answer is cut away
    with pytest.raises(DataError, match=r"record 3 \(id='no-tag'\)"):   # met in training (at start-up: test_run_log)
        run_main(args + ["--check_data_at_start=false"])   # bad_samples="error" (the default) stops
    final, losses = run_main(args + ["--bad_samples=skip"])
    out = capsys.readouterr().out
    assert f"9 records of {path} skipped (6 when loading, 3 when read" in out
    rows = json.load(open(os.path.join(final, "skipped.json")))
    assert {r["index"] for r in rows} == set(expected)
    assert {r["id"] for r in rows if r["when"] == "read"} == {"missing", "corrupt", "too-long"}
    assert all(torch.isfinite(torch.tensor(x)) for x in losses["finetune"])


def test_a_crash_under_skip_loses_no_skipped_record(tiny_llms, tiny_towers, tmp_path, monkeypatch):
    """Each skip is logged as it is met: a run that dies mid-stage has them on disk, and its resumed run's
    skipped.json holds every one (those met before the crash included)."""
    path, images, expected = broken_dataset(tmp_path)
    args = train_args(tiny_llms, tiny_towers, path, images, tmp_path / "run", "--global_batch_size=2",
                      "--micro_batch_size=2", "--epochs=1", "--max_length=64", "--bad_samples=skip", "--save_every=1")
    real = train.save_checkpoint

    def crash(accelerator, work_dir, step, *rest):
        real(accelerator, work_dir, step, *rest)
        if step == 2:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(train, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run_main(args)
    monkeypatch.undo()
    from data import read_skip_log
    logged = read_skip_log(tmp_path / "run" / "1_finetune.partial" / "skipped.rank0.jsonl")
    assert {r["index"] for r in logged if r["when"] == "load"} == {3, 4, 5, 6, 8, 9}   # on disk before the crash
    final, _ = run_main(args + ["--resume"])
    assert {r["index"] for r in json.load(open(os.path.join(final, "skipped.json")))} == set(expected)


def poison_loss(monkeypatch, from_call, to_call=10 ** 9):
    """TinyLlava.forward returns a NaN loss on training calls from_call..to_call (1-based)."""
    from model import TinyLlava
    real, calls = TinyLlava.forward, [0]

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if kwargs.get("labels") is not None and self.training:
            calls[0] += 1
            if from_call <= calls[0] <= to_call:
                out = {**out, "loss_sum": out["loss_sum"] * float("nan")}
        return out
    monkeypatch.setattr(TinyLlava, "forward", forward)


def test_a_nonfinite_step_is_skipped_and_counted(tiny_llms, tiny_towers, tmp_path, monkeypatch, capsys):
    data, images = write_dataset(str(tmp_path / "d"), n=12, text_only=0)
    common = ["--global_batch_size=4", "--micro_batch_size=2", "--max_steps=4", "--save_every=1", "--keep_checkpoints=5",
              "--gradient_checkpointing=false"]   # no auto trial step: poison_loss counts the loop's forwards
    _, clean = run_main(train_args(tiny_llms, tiny_towers, data, images, tmp_path / "clean", *common))
    poison_loss(monkeypatch, 3, 4)                      # both micro-batches of step 2
    final, losses = run_main(train_args(tiny_llms, tiny_towers, data, images, tmp_path / "nan", *common))
    losses = losses["finetune"]
    assert losses[0] == pytest.approx(clean["finetune"][0]) and losses[1] != losses[1]   # NaN
    assert "step 2: loss nan / gradient norm nan not finite: step skipped (1 in a row" in capsys.readouterr().out
    assert all(x == x for x in losses[2:])
    model = load_pretrained(final)[0]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # no checkpoint is written after a skipped step (a run of them would push out the last good one)
    ckpt = sorted(os.listdir(os.path.join(final, "checkpoints")))
    assert ckpt == ["step_00000001", "step_00000003"]


def test_nonfinite_steps_in_a_row_stop_the_run_and_nothing_nonfinite_is_saved(tiny_llms, tiny_towers, tmp_path,
                                                                             monkeypatch):
    data, images = write_dataset(str(tmp_path / "d"), n=12, text_only=0)
    poison_loss(monkeypatch, 3)                         # every step from step 2 on
    args = train_args(tiny_llms, tiny_towers, data, images, tmp_path / "run", "--gradient_checkpointing=false",
                      "--global_batch_size=4", "--micro_batch_size=2", "--max_steps=6", "--save_every=1",
                      "--max_nonfinite_steps=2",
                      "--keep_checkpoints=5")
    with pytest.raises(RuntimeError, match=r"2 steps in a row with a non-finite loss.*\(steps 2-3\).*before step 2: "
                                           r".*step_00000001 .*--resume_allow=lr"):
        run_main(args)
    monkeypatch.undo()
    # weights poisoned by an optimizer step: the checkpoint refuses to save them, the last good one stays
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        if self.state[self.param_groups[0]["params"][0]]["step"] >= 2:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(RuntimeError, match="non-finite weights before the checkpoint of step 2: not saved"):
        run_main(args[:-3] + ["--out_dir=" + str(tmp_path / "run2"), "--save_every=1"])
    assert sorted(os.listdir(tmp_path / "run2" / "1_finetune.partial" / "checkpoints")) == ["step_00000001"]


def kill_args(tiny_llms, tiny_towers, tmp_path):
    data, images = write_dataset(str(tmp_path / "d"), n=16, text_only=4)
    return lambda out: train_args(tiny_llms, tiny_towers, data, images, out, "--global_batch_size=4",
                                  "--micro_batch_size=2", "--max_steps=8", "--save_every=2", "--keep_checkpoints=2")


def test_sigkill_during_a_save_and_at_a_random_step_then_resume(tiny_llms, tiny_towers, tmp_path):
    args = kill_args(tiny_llms, tiny_towers, tmp_path)
    final, full = run_main(args(tmp_path / "full"))
    env = {**os.environ, "KILL_SAVE_STEP": "4", "DS_ACCELERATOR": "cpu"}
    # 1. killed while writing step 4's checkpoint: step 2's stays the latest complete one
    p = subprocess.run([sys.executable, "tests/kill_worker.py", *args(tmp_path / "a")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL and "SIGKILL while writing" in p.stdout, p.stderr[-2000:]
    ckpts = sorted(os.listdir(tmp_path / "a" / "1_finetune.partial" / "checkpoints"))
    assert ckpts == ["step_00000002", "step_00000004.tmp"]     # the half-written one is never picked up
    assert train.latest_checkpoint(str(tmp_path / "a" / "1_finetune.partial")).endswith("step_00000002")
    # 2. plain train.py killed at a random step (seeded), whatever it was doing
    k = random.Random(0).randint(3, 7)
    proc = subprocess.Popen([sys.executable, "train.py", *args(tmp_path / "b")], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in proc.stdout:
        if line.startswith(f"step {k}/8 "):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=300) == -signal.SIGKILL
    # "step k" is logged before step k's checkpoint is written: the latest complete one is the last even step < k
    for out, first in ((tmp_path / "a", 2), (tmp_path / "b", 2 * ((k - 1) // 2))):
        assert train.latest_checkpoint(str(out / "1_finetune.partial")).endswith(f"step_{first:08d}")
        _, resumed = run_main(args(out) + ["--resume"])
        assert resumed["finetune"] == pytest.approx(full["finetune"][first:], rel=1e-5)
        a, b = load_pretrained(final)[0].state_dict(), load_pretrained(str(out / "1_finetune"))[0].state_dict()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

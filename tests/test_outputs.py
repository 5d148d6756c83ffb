"""What evaluate.py writes (issue #23): every output file of a question set is named after it, so two sets in one
folder never overwrite each other while the official benchmarks keep the names their scorers and upload pages
expect; and a file that cannot be written (a full disk, a file where a folder should be) is one line naming it."""
import builtins
import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import evaluate
from test_evaluate import dump, image, run, setup  # noqa: F401 (setup: the tiny model and benchmark fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--max-new-tokens", "3", "--threads", "1"]


def question_set(folder, questions):
    """A --bench custom set as --data takes it: questions.jsonl, answers.jsonl, images/."""
    image(f"{folder}/images/a.png")
    dump(f"{folder}/questions.jsonl", [{"question_id": i, "image": "a.png", "text": q, "category": "c"}
                                       for i, q in enumerate(questions)], lines=True)
    dump(f"{folder}/answers.jsonl", [{"question_id": i, "answers": ["red"]} for i in range(len(questions))], True)
    return folder


def test_two_question_sets_in_the_default_folder_never_overwrite_each_other(setup, tmp_path, capsys):
    """The issue's case: two `--bench custom` sets (each a folder with its questions.jsonl) answered into the
    default folder <model>/eval. The second used to move the first's answers aside and overwrite its results."""
    model = str(tmp_path / "model")
    shutil.copytree(setup[0], model)
    a = question_set(str(tmp_path / "setA"), ["What colour?", "Is it red?"])
    b = question_set(str(tmp_path / "setB"), ["How many?", "Which digit?", "Is it blue?"])
    first = evaluate.main(["--model", model, "--bench", "custom", "--data", a, *ARGS])[0]
    eval_dir = os.path.join(model, "eval")
    before = {p: open(p, "rb").read() for p in glob.glob(f"{eval_dir}/*")}
    second = evaluate.main(["--model", model, "--bench", "custom", "--data", b, *ARGS])[0]
    out = capsys.readouterr().out
    assert "moved aside" not in out and not glob.glob(f"{eval_dir}/*.old")
    assert all(open(p, "rb").read() == data for p, data in before.items())   # the first set's files as they were
    results = sorted(glob.glob(f"{eval_dir}/*_results.json"))
    assert [json.load(open(p))["count"] for p in results] == [2, 3]
    assert first["name"].startswith("custom-setA-") and second["name"].startswith("custom-setB-")
    assert f"answers and results in {eval_dir}: {second['name']}_*" in out
    # the same set again, by folder or by file: its own answers are found and reused, nothing is answered again
    again = evaluate.main(["--model", model, "--bench", "custom", "--data", a, *ARGS])[0]
    by_file = evaluate.main(["--model", model, "--bench", "custom", "--questions", f"{a}/questions.jsonl",
                             "--annotations", f"{a}/answers.jsonl", "--image-folder", f"{a}/images", *ARGS])[0]
    assert again["reused"] == by_file["reused"] == 2 and again["name"] == by_file["name"] == first["name"]
    assert "moved aside" not in capsys.readouterr().out


def test_official_names_hold_and_another_question_file_gets_its_own(setup, tmp_path):
    """A benchmark's own question file keeps the official names (gqa_answers.jsonl, gqa_results.json, the
    predictions GQA's eval.py reads); a question file of one's own for it (a subset) writes beside them, untouched."""
    model, data, _ = setup
    out = str(tmp_path / "out")
    full = run(model, data, out, "--bench", "gqa")[0]
    official = ["gqa_answers.jsonl", "gqa_answers.settings.json", "gqa_results.json",
                "gqa_testdev_balanced_predictions.json"]
    assert sorted(os.listdir(out)) == sorted(official)
    before = {n: open(f"{out}/{n}", "rb").read() for n in official}
    rows = evaluate.read_json(f"{data}/gqa/llava_gqa_testdev_balanced.jsonl")
    dump(str(tmp_path / "mine" / "gqa_first.jsonl"), rows[:1], lines=True)
    sub = run(model, f"{data}/gqa", out, "--bench", "gqa", "--questions", str(tmp_path / "mine" / "gqa_first.jsonl"))[0]
    assert {n: open(f"{out}/{n}", "rb").read() for n in official} == before
    assert full["name"] == "gqa" and sub["name"].startswith("gqa-gqa_first-") and sub["count"] == 1
    assert sorted(set(os.listdir(out)) - set(official)) == sorted(
        f"{sub['name']}{s}" for s in ("_answers.jsonl", "_answers.settings.json", "_results.json",
                                      "_testdev_balanced_predictions.json"))


# ---------------------------------------------------------------------- a full disk: one line naming the file
class FullDisk:
    """A file opened for writing on a full disk: opening works, writing fails with ENOSPC, as the kernel does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def fill_disk_at(monkeypatch, ending):
    """Every write to a file whose path ends in `ending` (or one of them) fails as on a full disk."""
    real = builtins.open

    def fake(path, mode="r", *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith(ending) and set(mode) & set("wax+") else f
    monkeypatch.setattr(builtins, "open", fake)


FILES = [   # (benchmark, the file whose writes fail, the file the message must name)
    ("pope", "/pope_answers.jsonl", "pope_answers.jsonl"),                  # the answers, a window at a time
    ("pope", "/pope_answers.jsonl.tmp", "pope_answers.jsonl"),              # the merged answer file
    ("pope", "/pope_answers.settings.json.tmp", "pope_answers.settings.json"),
    ("pope", "/pope_results.json.tmp", "pope_results.json"),
    ("vqav2", "/vqav2_upload.json.tmp", "vqav2_upload.json"),              # the official tools' files
    ("gqa", "/gqa_testdev_balanced_predictions.json.tmp", "gqa_testdev_balanced_predictions.json"),
    ("mme", ("/mme_answers/count.txt", "/mme_answers/count.txt.tmp"), "mme_answers/count.txt"),   # direct or not
    ("mmvet", "/mmvet_submission.json.tmp", "mmvet_submission.json"),
    ("custom", "_results.json.tmp", "_results.json"),
]


@pytest.mark.parametrize("bench,ending,named", FILES, ids=[f"{b}:{n}" for b, _, n in FILES[:-1]] + ["custom"])
def test_a_full_disk_names_the_file(setup, tmp_path, monkeypatch, bench, ending, named):
    model, data, _ = setup
    out = str(tmp_path / "out")
    os.makedirs(out)
    if ending == "/pope_results.json.tmp":
        dump(f"{out}/pope_results.json", {"from": "an earlier run"})
    fill_disk_at(monkeypatch, ending)
    with pytest.raises(OSError) as e:
        run(model, data, out, "--bench", bench)
    message = str(e.value)
    assert message.startswith("cannot write ") and message.endswith(f": [Errno {errno.ENOSPC}] "
                                                                     f"{os.strerror(errno.ENOSPC)}"), message
    path = message[len("cannot write "):].split(": [Errno")[0]
    assert path.startswith(out + "/") and path.endswith(named) and "\n" not in message
    assert not glob.glob(f"{out}/**/*.tmp", recursive=True)                 # no half-written file left
    if ending == "/pope_results.json.tmp":
        assert evaluate.read_json(f"{out}/pope_results.json") == {"from": "an earlier run"}   # the old file stays


def test_moving_answers_aside_and_making_the_folder_name_the_file(setup, tmp_path, monkeypatch, capsys):
    model, data, _ = setup
    out = str(tmp_path / "out")
    run(model, data, out, "--bench", "pope")
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".old"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=rf"^cannot move aside {out}/pope_answers.jsonl: \[Errno {errno.EROFS}\] "):
        run(model, data, out, "--bench", "pope", "--max-new-tokens", "4")   # other settings: the old ones go aside
    monkeypatch.undo()
    open(tmp_path / "a_file", "w").close()
    with pytest.raises(SystemExit):   # --out is checked as it is parsed, before the model loads
        run(model, data, str(tmp_path / "a_file" / "eval"), "--bench", "pope")
    assert capsys.readouterr().err == (f"evaluate.py: error: --out: cannot make {tmp_path}/a_file/eval: "
                                       f"{tmp_path}/a_file is a file\n")


def test_the_command_line_on_a_full_disk(setup, tmp_path):
    """A real process writing to a real full device: the results file's temporary name is a link to /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    model, data, _ = setup
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/full", out / "pope_results.json.tmp")
    done = subprocess.run([sys.executable, "evaluate.py", "--model", model, "--data", data, "--bench", "pope",
                           "--out", str(out), "--max-new-tokens", "3", "--threads", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (f"evaluate.py: error: cannot write {out}/pope_results.json: "
                                                    f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}")
    assert (out / "pope_answers.jsonl").stat().st_size > 0                   # the answers made before it are kept

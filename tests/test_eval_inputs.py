"""What evaluate.py reads, checked before the model loads: a missing question file, image, label or ground-truth file
is one line naming the path and where it comes from; a custom benchmark from your own question and reference
files (exact match, VQA accuracy with 10 references, per category); single-reference VQAv2 annotations warn;
--help shows every option's default."""
import os
import shutil
import subprocess
import sys

import pytest

import evaluate
import model as model_py
from test_evaluate import dump, image, run, setup  # noqa: F401 (setup: the tiny model and benchmark fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_model(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the benchmark's files were checked")
    monkeypatch.setattr(model_py, "load_pretrained", load)   # evaluate.py's entry point, every layout


@pytest.mark.parametrize("bench,remove,said", [
    ("gqa", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa: no question file {}; it is in LLaVA-1.5's eval.zip"),
    ("gqa", "gqa/data/testdev_balanced_questions.json", "gqa: {} not found; get it from GQA's site"),
    ("pope", "pope/coco/coco_pope_random.json", "pope: {} not found; get it from cocodataset.org"),
    ("scienceqa", "scienceqa/pid_splits.json", "scienceqa: {} not found; get it from github.com/lupantech"),
    ("mmmu", "MMMU/eval/answer_dict_val.json", "mmmu: {} not found"),
    ("textvqa", "textvqa/train_images", "textvqa: {} not found (1 of the 1 images asked about are missing)"),
    ("vqav2", "vqav2/test2015/COCO_test2015_2.jpg", "vqav2: {} not found (1 of the 3 images"),
    ("mme", "MME/MME_Benchmark_release_version", "mme: {} not found; get it from the MME authors"),
    ("custom", "custom/answers.jsonl", "custom: {} not found"),
])
def test_missing_files_fail_before_the_model_loads(setup, tmp_path, no_model, bench, remove, said):
    _, data, _ = setup
    copy = str(tmp_path / "data")
    shutil.copytree(data, copy)
    path = os.path.join(copy, remove)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if bench == "textvqa":
        path = os.path.join(path, "abc1.jpg")
    (tmp_path / "model").mkdir()   # (never loaded: an empty folder)
    with pytest.raises(FileNotFoundError) as e:   # vqav2 first: nothing is answered while a later one is missing
        run(str(tmp_path / "model"), copy, str(tmp_path / "out"), "--bench", f"vqav2,{bench}" if bench != "vqav2"
            else bench, "--template", "llama")
    assert said.format(path) in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_the_command_line_says_it_in_one_line(setup, tmp_path):
    model, data, _ = setup
    done = subprocess.run([sys.executable, "evaluate.py", "--model", model, "--data", str(tmp_path), "--bench",
                           "pope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"evaluate.py: error: pope: no question file {tmp_path}/pope/llava_pope_test.jsonl; it is in LLaVA-1.5's "
        "eval.zip (README: Evaluation)"]


def test_a_custom_benchmark_from_your_own_files(setup, tmp_path, capsys):
    """--questions + --annotations (+ --image-folder), no --data; answers pre-written, so the scores are derived by
    hand: exact match after the VQA normalisation, VQA accuracy where 10 references, per category."""
    model, _, _ = setup
    qs = [{"question_id": 1, "image": "a.png", "text": "Which digit?", "category": "digit"},
          {"question_id": 2, "image": "a.png", "text": "Is it even?", "category": "parity"},
          {"question_id": 3, "image": "b.png", "text": "Which digit?", "category": "digit"}]
    dump(str(tmp_path / "mine" / "q.jsonl"), qs, lines=True)
    image(str(tmp_path / "pics" / "a.png"))
    image(str(tmp_path / "pics" / "b.png"))
    # references as a VQAv2 annotation file: 10 answers for 1 and 3, one for 2
    dump(str(tmp_path / "mine" / "refs.json"), {"annotations": [
        {"question_id": 1, "answers": [{"answer": "4"}] * 10},
        {"question_id": 2, "answers": [{"answer": "yes"}]},
        {"question_id": 3, "answers": [{"answer": "seven"}] * 2 + [{"answer": "1"}] * 8}]})
    out = str(tmp_path / "out")
    name = evaluate.set_name("custom", str(tmp_path / "mine" / "q.jsonl"), "questions.jsonl")   # custom-q-<hash>
    dump(f"{out}/{name}_answers.jsonl", [{"question_id": q["question_id"], "prompt": q["text"], "text": t}
                                         for q, t in zip(qs, ["Four.", "Yes", "7"])], lines=True)
    args = ["--model", model, "--bench", "custom", "--questions", str(tmp_path / "mine" / "q.jsonl"), "--annotations",
            str(tmp_path / "mine" / "refs.json"), "--image-folder", str(tmp_path / "pics"), "--out", out]
    res = evaluate.main(args + ["--keep-answers"])[0]
    # "Four." -> "4": right, all 10 agree (VQA 100); "Yes" right (1 reference: no VQA accuracy); "7" = "seven"
    # (number words) with 2 of 10: right by exact match, VQA min(1, 2/3) or 1/3 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert res["headline"] == {"exact_match": 100.0} and res["split"] == "q" and res["name"] == name
    m = res["metrics"]
    assert (m["vqa_accuracy"], m["vqa_n"], m["n"]) == (pytest.approx(80.0), 2, 3)
    assert m["categories"]["digit"] == {"exact_match": 100.0, "n": 2, "vqa_accuracy": pytest.approx(80.0),
                                        "vqa_n": 2}
    assert m["categories"]["parity"] == {"exact_match": 100.0, "n": 1}
    table = capsys.readouterr().out
    assert "custom" in table and "  digit" in table and "  parity" in table
    dump(str(tmp_path / "mine" / "refs.json"), [{"question_id": 1, "answers": ["4"]}])   # 2 and 3 lack references
    with pytest.raises(ValueError, match=r"refs.json has no reference answers for 2 questions, e.g. '2'"):
        evaluate.main(args)


def test_single_reference_vqav2_annotations_warn(setup, tmp_path, capsys):
    model, data, _ = setup
    anns = str(tmp_path / "one_answer.json")
    dump(anns, {"annotations": [{"question_id": q, "answers": [{"answer": "2"}]} for q in (1, 2, 3)]})
    run(model, f"{data}/vqav2", str(tmp_path / "out"), "--bench", "vqav2", "--annotations", anns)
    assert "warning: 3 of 3 questions in " + anns + " have fewer than the 10 answers" in capsys.readouterr().out


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    options = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]
    assert len(options) > 20 and "--dtype" in options and "--device" in options
    entries = [" ".join(e.split()) for e in text.split("\n  --")[1:]]   # help wraps at any space
    assert all("(default: " in e for e in entries), [e.split()[0] for e in entries if "(default: " not in e]


def test_threads_are_set_and_checked(setup, tmp_path):
    """--threads N runs torch on N threads; 0 or a negative count is one line, before the model loads."""
    import torch
    model, data, _ = setup
    before = torch.get_num_threads()
    try:
        run(model, data, str(tmp_path), "--bench", "pope", "--limit", "2", "--threads", "1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    p = subprocess.run([sys.executable, "evaluate.py", "--model", model, "--bench", "pope", "--threads", "0"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "--threads" in p.stderr and "Traceback" not in p.stderr

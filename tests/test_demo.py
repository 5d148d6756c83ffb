"""The embedded demo (demo.py, configs/demo.py, demo/): the base models it builds load back, a shortened demo
learns what a model that learned nothing cannot score, and the same command with the same seed gives the same
losses twice."""
import glob
import json
import os

import pytest
from accelerate.state import AcceleratorState

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)   # the demo's paths (configs/demo.py, demo/) are relative to the repository
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The demo's random-init base models, built once (demo.py --only-base) in a temp folder."""
    d = str(tmp_path_factory.mktemp("demo_base"))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        import demo as d_
        saved, d_.BASE = d_.BASE, d
        try:
            d_.main(["--only-base"])
        finally:
            d_.BASE = saved
    finally:
        os.chdir(cwd)
    return d


def test_only_base_writes_loadable_models(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
    llm = AutoModelForCausalLM.from_pretrained(f"{base}/llm")
    tower = SiglipVisionModel.from_pretrained(f"{base}/siglip")
    assert llm.config.hidden_size == demo.LLM["hidden_size"] and llm.config.num_hidden_layers == demo.LLM["num_hidden_layers"]
    assert tower.config.image_size == demo.TOWER["image_size"] and tower.config.patch_size == demo.TOWER["patch_size"]
    assert len(AutoTokenizer.from_pretrained(f"{base}/llm")) == llm.config.vocab_size
    assert not os.path.exists(f"{base}/1_pretrain")   # built, not trained


def test_help_lists_only_base(capsys):
    demo.main(["--help"])
    assert "--only-base" in capsys.readouterr().out


def test_eval_covers_every_type_with_balanced_pope():
    best = demo.constant_baselines()
    assert set(best) == {"digit", "color", "background", "even", "gt4", "same", "detail"} and best["same"] == 50.0
    assert max(best.values()) < 60   # no type is nearly answered by a constant
    with open(os.path.join(ROOT, "demo/eval/pope/coco/coco_pope_random.json")) as f:
        labels = [json.loads(line)["label"] for line in f if line.strip()]
    assert labels.count("yes") == labels.count("no") == 300


def run_demo(base, out, *extra):
    saved, demo.BASE = demo.BASE, base
    try:
        return demo.main([f"--out_dir={out}", "--log_every=1000", *extra])
    finally:
        demo.BASE = saved


def test_a_fresh_demo_clears_only_earlier_feature_caches(tmp_path):
    """The demo's feature cache (out_dir/features/<tower fingerprint>/) of an earlier run goes on a fresh start;
    anything else there stays."""
    cache = tmp_path / "features"
    (cache / "0123456789abcdef0123" / "ab").mkdir(parents=True)
    (cache / "0123456789abcdef0123" / "ab" / "x.safetensors").write_bytes(b"x")
    (cache / "notes").mkdir()
    (cache / "0123456789abcdef012").mkdir()   # 19 hex digits: not a fingerprint
    (cache / "fedcba9876543210fedc").write_text("a file, not a cache folder")
    demo.forget_features(str(cache))
    assert sorted(os.listdir(cache)) == ["0123456789abcdef012", "fedcba9876543210fedc", "notes"]
    demo.forget_features(str(tmp_path / "missing"))   # nothing there: nothing to do


def test_short_demo_learns_what_guessing_cannot(base, tmp_path):
    """A shortened demo (4 pretrain epochs, 750 of the 2530 finetune steps, the questions of 100 held-out images;
    about 1.5 CPU-minutes) is far above what any constant answer gets on the types it has had time for: the colours
    (measured 100) and the digit (measured 76 with the two-image records in; 0-19 after 150-300 steps)."""
    scores = run_demo(base, tmp_path, "--pretrain.epochs=4", "--finetune.max_steps=750", "--eval_images=100")
    best = demo.constant_baselines()
    assert scores["background"] > 95 and scores["color"] > 95
    assert scores["digit"] > best["digit"] + 30


def test_same_seed_same_losses_twice(base, tmp_path):
    """The same command on the same machine: the same losses, step for step, and the same answers."""
    args = ("--pretrain.max_steps=12", "--finetune.max_steps=12", "--eval_images=20")
    runs = []
    for name in ("a", "b"):
        scores = run_demo(base, tmp_path / name, *args)
        losses = {s: json.load(open(tmp_path / name / d / "losses.json"))
                  for s, d in (("pretrain", "1_pretrain"), ("finetune", "2_finetune"))}
        answers, = glob.glob(str(tmp_path / name / "2_finetune" / "eval" / "custom-llava*_answers.jsonl"))   # the set's
        answers = open(answers).read()
        runs.append((losses, scores, [json.loads(line)["text"] for line in answers.splitlines()]))
    assert runs[0][0] == runs[1][0]   # exactly, not approximately
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]


def test_a_mistyped_command_is_one_line():
    import subprocess
    import sys
    for arg, said in [("--bogus=1", "unknown config key 'bogus'"), ("--eval_images=x", "--eval_images")]:
        p = subprocess.run([sys.executable, "demo.py", arg], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and said in p.stderr and "Traceback" not in p.stderr, p.stderr[-500:]

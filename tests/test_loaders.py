"""What a folder handed to a loader can make us do (issue #23). No command reaches transformers' "Do you wish to run
the custom code? [y/N]" (every from_pretrained is given trust_remote_code: the user's flag, else False), so a "y" on
stdin runs nothing; a folder whose tokenizer or image processor asks for its own code is one line. NaN / inf weights
are refused in one line naming the tensor, by every command. convert.py writes only into a new or empty folder, or
with --overwrite into one it wrote, and never deletes a file it did not write. Each command runs as a real process,
as a user would start it, with stdin answering "y"."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
import folders
from conftest import write_dataset
from model import ModelArgs, build_model, load_pretrained, save_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASKED = "Do you wish to run the custom code"
TRAIN = ["--template=llama", "--bf16=false", "--num_workers=0", "--max_length=256", "--global_batch_size=2",
         "--micro_batch_size=2", "--max_steps=1", "--threads=1", "--gradient_checkpointing=false",
         "--stages=[{'name': 'finetune', 'data': 'finetune', 'tune_llm': 'full', 'tune_connector': 'full'}]"]


@pytest.fixture(scope="module")
def made(tiny_llms, tiny_towers, tmp_path_factory):
    """A stage folder of ours (template llama), a finetune data set and a custom benchmark of one question."""
    root = tmp_path_factory.mktemp("loaders")
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    save_pretrained(model, tok, proc, str(root / "model"), template="llama")
    (root / "model" / "train_config.json").write_text(json.dumps({"template": "llama"}))
    data, images = write_dataset(str(root / "data"), n=2, text_only=0)
    bench = root / "bench" / "custom"
    (bench / "images").mkdir(parents=True)
    shutil.copy(os.path.join(images, "0.png"), bench / "images" / "q.png")
    (bench / "questions.jsonl").write_text(json.dumps({"question_id": "q", "image": "q.png", "text": "Colour?"}))
    (bench / "answers.jsonl").write_text(json.dumps({"question_id": "q", "answers": ["red"]}))
    return dict(model=str(root / "model"), data=data, images=images, bench=str(root / "bench"),
                llm=tiny_llms["llama"], tower=tiny_towers["siglip"], root=root)


def commands(cmds, tmp_path, stdin="y\n" * 8, parallel=3):
    """Run each command (a script and its arguments) in its own process from the repository root, `parallel` at a
    time, stdin answering "y" to whatever asks; returns {name: CompletedProcess}."""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TRANSFORMERS_VERBOSITY="error",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done, todo = {}, list(cmds.items())
    while todo:
        batch, todo = todo[:parallel], todo[parallel:]
        procs = {name: subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, argv in batch}
        for name, p in procs.items():
            out, err = p.communicate(stdin, timeout=600)
            done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def error_lines(p):
    """The lines of stderr that are ours (not the warnings of libraries) and whether a traceback was printed."""
    return [line for line in p.stderr.splitlines() if ": error: " in line], "Traceback" in p.stderr


# ---------------------------------------------------------------------------------------------- remote code
EVIL = """open({marker!r}, "a").write("ran\\n")
from transformers import LlavaConfig, PreTrainedTokenizerFast, ProcessorMixin, SiglipImageProcessor
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilImageProcessor(SiglipImageProcessor):
    pass
class EvilProcessor(ProcessorMixin):
    pass
class EvilConfig(LlavaConfig):
    model_type = "evil"
"""


def edit_json(path, change):
    with open(path) as f:
        cfg = json.load(f)
    change(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def plant(folder, marker, tokenizer=False, image_processor=False, processor=False, config=None, modeling=False):
    """Code in `folder` that writes `marker` when imported, and the auto_maps that name it, with class names
    transformers does not have (so that, without an explicit trust_remote_code, it asks)."""
    with open(os.path.join(folder, "evil.py"), "w") as f:
        f.write(EVIL.format(marker=str(marker)))
    if modeling:   # the modeling files our config.json names for transformers
        for name in folders.CODE:
            with open(os.path.join(folder, name), "w") as f:
                f.write(f"open({str(marker)!r}, 'a').write('ran\\n')\n")
        edit_json(os.path.join(folder, "config.json"), lambda c: c.update(trust_remote_code=True))
    if tokenizer:
        edit_json(os.path.join(folder, "tokenizer_config.json"), lambda c: c.update(
            tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}))
    image = {"image_processor_type": "EvilImageProcessor",
             "auto_map": {"AutoImageProcessor": "evil.EvilImageProcessor"}}
    if image_processor:
        edit_json(os.path.join(folder, "preprocessor_config.json"), lambda c: c.update(image))
    if processor:   # a Llava folder: the image processor's settings live inside processor_config.json
        edit_json(os.path.join(folder, "processor_config.json"), lambda c: (c["image_processor"].update(image),
                  c.update(processor_class="EvilProcessor", auto_map={"AutoProcessor": "evil.EvilProcessor"})))
    if config:
        edit_json(os.path.join(folder, "config.json"), lambda c: c.update(auto_map=config))
    return folder


def test_no_command_asks_to_run_a_folders_code(made, tmp_path, monkeypatch):
    """Folders that ask for their own code, under every command, stdin answering "y": no marker. On ed39f35
    evaluate.py on a Llava folder and train.py / check_data.py on a tower asked, and "y" ran the code. Refusals run
    as processes (their one line is __main__'s); the folders that load run in this process, stdin saying "y" too."""
    import io
    import chat
    import evaluate
    marker, m = tmp_path / "MARKER", made["model"]
    copy = lambda name: shutil.copytree(m, str(tmp_path / name))  # noqa: E731
    runs = plant(copy("runs"), marker, modeling=True)               # our modeling code planted: not ours to run
    asks = plant(copy("asks"), marker, tokenizer=True, image_processor=True, modeling=True)
    tower = plant(shutil.copytree(made["tower"], str(tmp_path / "tower")), marker, image_processor=True,
                  config={"AutoConfig": "evil.EvilConfig"})
    convert.main(["to-llava", m, str(tmp_path / "llava")])
    llava = plant(str(tmp_path / "llava"), marker, tokenizer=True, processor=True,
                  config={"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilConfig"})
    convert.main(["to-tinyllava", m, str(tmp_path / "original")])
    original = plant(str(tmp_path / "original"), marker, modeling=True)   # its auto_map names our (planted) code
    cfg = tmp_path / "config.py"
    cfg.write_text(f"llm = {made['llm']!r}\nvision_tower = {tower!r}\ntemplate = 'llama'\n")
    data = [f"--data_finetune={made['data']}", f"--images_finetune={made['images']}"]
    evaluate_args = ["--bench", "custom", "--data", made["bench"], "--max-new-tokens", "2", "--threads", "1"]
    p = commands({
        "evaluate llava": ["evaluate.py", *evaluate_args, "--model", llava, "--out", str(tmp_path / "e1")],
        "chat asks": ["chat.py", "--model", asks, "--prompt", "Hi"],
        "convert asks": ["convert.py", "to-tinyllava", asks, str(tmp_path / "c3")],
        "train init_from": ["train.py", f"--init_from={asks}", f"--out_dir={tmp_path / 't1'}", *data, *TRAIN],
        "train tower": ["train.py", f"--llm={made['llm']}", f"--vision_tower={tower}", f"--out_dir={tmp_path / 't2'}",
                        *data, *TRAIN],
        "check_data config": ["check_data.py", made["data"], "--config", str(cfg)],
        "check_data model": ["check_data.py", made["data"], "--model", asks],
        "transformers alone": ["-c", "import sys\nfrom transformers import AutoImageProcessor, AutoTokenizer\n"   # the
                               f"print(type(AutoTokenizer.from_pretrained({runs!r}, trust_remote_code=False)).__name__,"
                               f" type(AutoImageProcessor.from_pretrained({runs!r})).__name__)"],   # docstring's way
    }, tmp_path)
    assert not marker.exists(), [n for n, r in p.items() if ASKED in r.stdout + r.stderr]
    for name, r in p.items():
        assert ASKED not in r.stdout + r.stderr, name
    said = "asks to run code of its own (auto_map), which is not run"
    for name, script, status in [("evaluate llava", "evaluate", 2), ("chat asks", "chat", 2),
                                 ("convert asks", "convert", 2), ("train init_from", "train", 2),
                                 ("train tower", "train", 2)]:
        lines, traceback = error_lines(p[name])
        assert p[name].returncode == status and not traceback, (name, p[name].stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: ") and said in lines[0], (name, lines)
    for name in ("check_data config", "check_data model"):   # refused, as the others
        assert p[name].returncode != 0 and said in p[name].stderr, (name, p[name].stderr[-2000:])
    tokenizer, image_processor = p["transformers alone"].stdout.split()   # no question, no code: the right classes
    assert tokenizer == "LlamaTokenizer" and image_processor.startswith("SiglipImageProcessor"), p["transformers alone"]

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 50))   # the folders that load: the planted code unneeded
    chat.main(["--model", runs, "--prompt", "Hi", "--max-new-tokens", "2", "--no-stream"])
    chat.main(["--model", original, "--template", "llama", "--prompt", "Hi", "--max-new-tokens", "2", "--no-stream"])
    convert.main(["to-llava", runs, str(tmp_path / "c1")])
    convert.main(["from-tinyllava", original, str(tmp_path / "c2")])
    evaluate.main([*evaluate_args, "--model", runs, "--out", str(tmp_path / "e2")])
    assert not marker.exists() and sys.stdin.read() == "y\n" * 50   # nothing asked


def test_the_flag_never_runs_a_saved_folders_tokenizer_code(made, tmp_path):
    """--trust-remote-code is for an LLM's own code (OpenELM); a folder of ours is saved without code, so the code its
    tokenizer or image processor files name never runs, flag or not (on ed39f35 the flag ran the tokenizer's)."""
    marker = tmp_path / "MARKER"
    d = plant(shutil.copytree(made["model"], str(tmp_path / "m")), marker, tokenizer=True, modeling=True)
    with pytest.raises(folders.LoadError, match=r"its tokenizer asks to run code of its own \(auto_map\), which is "
                                                 r"not run$"):
        load_pretrained(d, trust_remote_code=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- non-finite weights
def spoil(folder, key_part, value=float("nan")):
    """One element of the first tensor whose name holds `key_part`, in the folder's model.safetensors, set to `value`;
    returns the tensor's name."""
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    name = next(k for k in sorted(weights) if key_part in k)
    weights[name].view(-1)[0] = value
    save_file(weights, path, metadata={"format": "pt"})
    return name


def test_non_finite_weights_are_refused_by_every_command(made, tmp_path):
    """A NaN in one tensor: one line naming it, under chat, evaluate, convert and train --init_from (on ed39f35 chat
    answered "!!!!", evaluate scored it, convert exported it, train stopped after 3 steps advising a lower lr)."""
    d = shutil.copytree(made["model"], str(tmp_path / "nan"))
    name = spoil(d, "layers.1.mlp")
    p = commands({
        "chat": ["chat.py", "--model", d, "--prompt", "Hi", "--max-new-tokens", "2"],
        "evaluate": ["evaluate.py", "--model", d, "--bench", "custom", "--data", made["bench"], "--out",
                     str(tmp_path / "e"), "--threads", "1"],
        "convert": ["convert.py", "to-tinyllava", d, str(tmp_path / "c")],
        "train": ["train.py", f"--init_from={d}", f"--out_dir={tmp_path / 't'}", f"--data_finetune={made['data']}",
                  f"--images_finetune={made['images']}", *TRAIN],
    }, tmp_path)
    for script, status in [("chat", 2), ("evaluate", 2), ("convert", 2), ("train", 2)]:
        lines, traceback = error_lines(p[script])
        assert p[script].returncode == status and not traceback, (script, p[script].stderr[-2000:])
        assert lines == [f"{script}.py: error: {d}: weight {name} holds NaN values: refusing to load a non-finite "
                         "model (a diverged or damaged checkpoint)"], (script, p[script].stderr[-2000:])
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "t" / "1_finetune")


def test_non_finite_weights_are_refused_by_every_loader(made, tmp_path):
    """The original's layouts, a model built from parts, a transformers Llava folder (evaluate.py): the same check."""
    import argparse
    import evaluate
    model, tok, proc = load_pretrained(made["model"])
    convert.save_tinyllava(model, tok, proc, str(tmp_path / "original"), "llama")
    name = spoil(str(tmp_path / "original"), "connector", float("inf"))
    with pytest.raises(folders.LoadError, match=r"holds infinite values") as e:
        load_pretrained(str(tmp_path / "original"))
    assert name.replace("connector._connector.", "") in str(e.value) and "\n" not in str(e.value)
    llm = shutil.copytree(made["llm"], str(tmp_path / "llm"))
    name = spoil(llm, "embed_tokens")
    with pytest.raises(folders.LoadError, match=f"weight language_model.{name} holds NaN values"):
        build_model(ModelArgs(llm=llm, vision_tower=made["tower"]))
    convert.export_llava(model, tok, proc, str(tmp_path / "llava"), "llama")
    name = spoil(str(tmp_path / "llava"), "multi_modal_projector")
    with pytest.raises(folders.LoadError, match=f"weight {name} holds NaN values"):
        evaluate.load_model(argparse.Namespace(model=str(tmp_path / "llava"), dtype="float32", trust_remote_code=False),
                            True, torch.device("cpu"))
    model.connector._connector[0].weight.data[0, 0] = float("nan")
    with pytest.raises(folders.LoadError, match="weight connector._connector.0.weight holds NaN"):
        folders.check_finite(model, "here")


# ---------------------------------------------------------------------------------------------- convert's outputs
def snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def test_convert_writes_only_into_a_new_empty_or_its_own_folder(made, tmp_path, capsys):
    """Another model's folder is refused, --overwrite or not, and left as it was (on ed39f35 `to-tinyllava SRC
    <another model's folder>` overwrote its weights and config); convert's own output needs --overwrite, which
    replaces exactly the files convert wrote (a file the user added stays, a file only the earlier command wrote
    goes); an empty folder is taken, a file is not."""
    m, out = made["model"], str(tmp_path / "out")
    other = shutil.copytree(m, str(tmp_path / "other"))   # a stage folder: train.py wrote it, not convert.py
    before = snapshot(other)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match=f"^{other} is not empty and convert.py did not write it .*even with "
                                             "--overwrite; choose a new or empty folder$"):
            convert.main(["to-tinyllava", m, other, *extra])
    assert snapshot(other) == before
    p = commands({"convert": ["convert.py", "to-tinyllava", m, other, "--overwrite"]}, tmp_path)["convert"]
    assert p.returncode == 2 and error_lines(p) == ([f"convert.py: error: {other} is not empty and convert.py did not "
                                                     f"write it (chat_template.jinja, config.json, generation_config."
                                                     "json, ...): refusing to write into it, even with --overwrite; "
                                                     "choose a new or empty folder"], False), p.stderr[-2000:]
    assert snapshot(other) == before

    convert.main(["to-tinyllava", m, out])
    record = json.load(open(os.path.join(out, folders.OUTPUT_RECORD)))
    assert record["tool"] == "convert.py" and record["command"] == "to-tinyllava" and record["kept"] == []
    assert set(record["files"]) == set(os.listdir(out)) - {folders.OUTPUT_RECORD}
    with pytest.raises(ValueError, match=f"{out} holds an earlier output of convert.py \\(to-tinyllava of .*\\): "
                                         "pass --overwrite"):
        convert.main(["to-llava", m, out])
    (tmp_path / "out" / "NOTES.md").write_text("mine")   # the user's, added later
    convert.main(["to-llava", m, out, "--overwrite"])
    names = set(os.listdir(out))
    assert "NOTES.md" in names and not names & set(folders.CODE)   # the Llava export has no modeling code
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "llava"
    record = json.load(open(os.path.join(out, folders.OUTPUT_RECORD)))
    assert record["kept"] == ["NOTES.md"] and set(record["files"]) == names - {folders.OUTPUT_RECORD, "NOTES.md"}

    # a run that did not finish (killed after the claim and a file): --overwrite takes what appeared after it began
    os.remove(os.path.join(out, "model.safetensors"))
    claim = folders.claim_output(out, "convert.py", overwrite=True, command="to-llava", source=m)
    assert claim["kept"] == ["NOTES.md"] and set(os.listdir(out)) == {"NOTES.md", folders.OUTPUT_RECORD}
    (tmp_path / "out" / "half.safetensors").write_text("half")
    convert.main(["to-tinyllava", m, out, "--overwrite"])
    assert "half.safetensors" not in os.listdir(out) and (tmp_path / "out" / "NOTES.md").read_text() == "mine"

    (tmp_path / "empty").mkdir()
    convert.main(["to-tinyllava", m, str(tmp_path / "empty")])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit):   # refused as DST's value, before anything loads
        convert.main(["to-tinyllava", m, str(tmp_path / "a-file")])
    assert capsys.readouterr().err == f"convert.py to-tinyllava: error: dst: {tmp_path}/a-file is a file, not a " \
        "folder\n"

"""What a checkpoint folder, an image or a full disk can make us do. A crafted folder (config.json saying
trust_remote_code, an auto_map to code beside it, an `llm` path to a folder with code, index entries leading outside,
a base model named by a relative path that climbs out with '..') never runs its code unless the user passes
--trust-remote-code, and its own modeling files never run in our loaders at all; the files it lists stay inside it
(the base models an original checkpoint names by absolute path or Hub id are read where they are); outputs carry no
code but ours (the modeling files transformers runs with trust_remote_code=True), never the flag; an export never
overwrites its source; a padded sliver of an image is a bad sample, not gigabytes; a failed write names its file and
leaves no half-written one."""
import errno
import json
import os
import re
import shutil

import pytest
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors import SafetensorError
from transformers import AutoTokenizer

import chat
import convert
import data
import folders
import images
import model as model_module
from conftest import write_dataset
from model import FeatureCache, ModelArgs, build_model, load_pretrained, save_pretrained
from test_checkpoints import original_config, original_parts, write_release

TOKENIZER = "from transformers import PreTrainedTokenizerFast\nclass EvilTok(PreTrainedTokenizerFast):\n    pass\n"
CONFIG = "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil_lm'\n"


@pytest.fixture(scope="module")
def saved(tiny_llms, tiny_towers, tmp_path_factory):
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    out = str(tmp_path_factory.mktemp("trust") / "model")
    save_pretrained(model, tok, proc, out)
    return out


def write_code(folder, marker, module, body):
    """folder/module.py: writes `marker` when imported, then defines `body`."""
    with open(os.path.join(folder, module + ".py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w').write('ran')\n{body}")


def edit_json(path, **changes):
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def crafted(saved, tmp_path, llm=None, text_type=None):
    """A copy of `saved` asking for its own code: trust_remote_code true, tokenizer and processor auto_maps to evil.py;
    with `llm`, a folder outside it whose config's auto_map leads to evilcfg.py."""
    d, marker = str(tmp_path / "crafted"), tmp_path / "MARKER"
    shutil.copytree(saved, d)
    write_code(d, marker, "evil", TOKENIZER + "class EvilProc:\n    pass\n")
    for name in folders.CODE:   # the modeling files transformers would run: ours never import them
        write_code(d, marker, name[:-3], "")
    edit_json(os.path.join(d, "tokenizer_config.json"), auto_map={"AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]})
    edit_json(os.path.join(d, "preprocessor_config.json"), auto_map={"AutoImageProcessor": "evil.EvilProc"})
    changes = {"trust_remote_code": True}
    if llm:
        os.makedirs(llm)
        write_code(llm, marker, "evilcfg", CONFIG)
        with open(os.path.join(llm, "config.json"), "w") as f:
            json.dump({"model_type": "evil_lm", "auto_map": {"AutoConfig": "evilcfg.EvilConfig"}}, f)
        changes["llm"] = llm
    if text_type:
        with open(os.path.join(d, "config.json")) as f:
            changes["text_config"] = dict(json.load(f)["text_config"], model_type=text_type)
    edit_json(os.path.join(d, "config.json"), **changes)
    return d, marker


def carries_no_code(out):
    """No code but ours: the .py files are our modeling files, byte for byte; an auto_map only in config.json and
    processor_config.json, naming our classes; no trust_remote_code: true anywhere in the folder's configs."""
    for name in os.listdir(out):
        if name.endswith(".py"):
            with open(os.path.join(os.path.dirname(folders.__file__), folders.CODE[name])) as ours, \
                    open(os.path.join(out, name)) as f:
                assert f.read() == ours.read(), name
        if name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                text, cfg = f.read(), json.loads(open(os.path.join(out, name)).read())
            assert '"trust_remote_code": true' not in text, name
            if name in ("config.json", "processor_config.json"):
                assert all(v.startswith("modeling_tinyllava_nano.") for v in cfg["auto_map"].values()), name
            else:
                assert "auto_map" not in text, name


def one_line(e):
    return "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- remote code
def test_a_checkpoint_never_turns_on_its_own_code(saved, tmp_path):
    d, marker = crafted(saved, tmp_path)
    model, tok, _ = load_pretrained(d)
    assert not marker.exists() and type(tok).__name__ != "EvilTok" and not model.args.trust_remote_code
    chat.main(["--model", d, "--template", "llama", "--prompt", "Hi", "--max-new-tokens", "1", "--no-stream"])
    assert not marker.exists()
    out = str(tmp_path / "original")
    convert.main(["to-tinyllava", d, out, "--template", "llama"])
    assert not marker.exists()
    carries_no_code(out)
    import argparse
    import evaluate
    import torch
    evaluate.load_model(argparse.Namespace(model=d, dtype="float32", trust_remote_code=False), False,
                        torch.device("cpu"))
    assert not marker.exists()
    for name in ("tokenizer_config.json", "preprocessor_config.json"):   # the user's flag: still not our folder's code
        edit_json(os.path.join(d, name), auto_map={})
    load_pretrained(d, trust_remote_code=True)
    assert not marker.exists()


def test_merge_loader_of_a_qlora_stage_runs_no_code(saved, tiny_llms, tiny_towers, tmp_path):
    from recipes import merge_adapters, wrap_lora
    d, marker = crafted(saved, tmp_path)
    model, _, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    cfg = dict(tune_llm="qlora", lora_r=4, lora_alpha=8, lora_dropout=0.0, trust_remote_code=False)
    model.language_model = wrap_lora(model.language_model, cfg, "CAUSAL_LM")
    merged, _ = merge_adapters(model, str(tmp_path / "stage"), cfg, d)
    assert merged is not None and not marker.exists()


def test_the_llm_path_is_not_consulted_without_the_flag(saved, tmp_path):
    d, marker = crafted(saved, tmp_path, llm=str(tmp_path / "elsewhere"))
    load_pretrained(d)                                  # a transformers LLM: its config is the saved one
    assert not marker.exists()
    d2, _ = crafted(saved, tmp_path / "b", llm=str(tmp_path / "b" / "elsewhere"), text_type="evil_lm")
    with pytest.raises(ValueError, match="pass --trust-remote-code") as e:
        load_pretrained(d2)                             # not one: refused before anything is read from `llm`
    assert one_line(e) and not (tmp_path / "b" / "MARKER").exists()


def test_the_flag_reaches_the_loader(saved, tmp_path, monkeypatch):
    seen = []
    fake = lambda path, **kw: seen.append(kw.get("trust_remote_code")) or pytest.fail("stop")  # noqa: E731
    monkeypatch.setattr(model_module, "load_pretrained", fake)   # chat.py's and convert.py's loader
    for run in (lambda flag: chat.main(["--model", saved, "--prompt", "Hi"] + flag),
                lambda flag: convert.main(["to-llava", saved, str(tmp_path / "x")] + flag)):
        for flag in ([], ["--trust-remote-code"]):
            with pytest.raises(pytest.fail.Exception):
                run(flag)
    assert seen == [False, True, False, True]


def test_outputs_carry_no_code_nor_the_flag(saved, tmp_path, tiny_llms, tiny_towers):
    """A user who trusted a remote-code tokenizer: save_pretrained copies its module; ours drops it."""
    import importlib.util
    import sys
    d, marker = crafted(saved, tmp_path)
    spec = importlib.util.spec_from_file_location("evil", os.path.join(d, "evil.py"))
    sys.modules["evil"] = evil = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(evil)
        evil.EvilTok.register_for_auto_class("AutoTokenizer")   # what a trust_remote_code load makes of it
        tok = evil.EvilTok.from_pretrained(d)
        model, _, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"],
                                               trust_remote_code=True))
        save_pretrained(model, tok, proc, str(tmp_path / "ours"))
        convert.save_tinyllava(model, tok, proc, str(tmp_path / "original"), "llama")
    finally:
        del sys.modules["evil"]
    for out in ("ours", "original"):
        carries_no_code(str(tmp_path / out))
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["trust_remote_code"] is False
    marker.unlink()
    load_pretrained(str(tmp_path / "ours"))
    assert not marker.exists()


def test_a_stage_trained_from_a_crafted_folder_carries_nothing(saved, tmp_path):
    import train
    d, marker = crafted(saved, tmp_path)
    data_file, images = write_dataset(str(tmp_path / "data"), n=2, text_only=0)
    AcceleratorState._reset_state(True)
    try:
        final, _ = train.main([
            f"--init_from={d}", "--template=llama", f"--data_finetune={data_file}", f"--images_finetune={images}",
            f"--out_dir={tmp_path / 'run'}", "--bf16=false", "--num_workers=0", "--max_length=256",
            "--global_batch_size=2", "--micro_batch_size=2", "--max_steps=1",
            "--stages=[{'name': 'finetune', 'data': 'finetune', 'tune_llm': 'full', 'tune_connector': 'full'}]"])
    finally:
        AcceleratorState._reset_state(True)
    assert not marker.exists()
    carries_no_code(final)


# ---------------------------------------------------------------------------------------------- paths
@pytest.fixture
def release(tiny_llms, tiny_towers, tmp_path):
    """The original's release layout, two shards with an index, its tokenizer (no image processor)."""
    lm, vt, conn = original_parts(tiny_llms, tiny_towers, "llama", "siglip")
    tok = AutoTokenizer.from_pretrained(tiny_llms["llama"])
    d = tmp_path / "ck" / "release"
    d.mkdir(parents=True)
    write_release(str(d), lm, vt, conn, original_config(lm, vt, tok), tok, shards=2)
    load_pretrained(str(d))   # as written, it loads
    return d


@pytest.mark.parametrize("target", ["../../outside.safetensors", "/etc/hostname", "../../../../../../etc/hostname"])
def test_an_index_cannot_lead_outside_the_checkpoint(release, target):
    index = release / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[0]
    if target.startswith("../../outside"):   # a real shard, moved out: the old reader loaded it
        shutil.move(str(release / shard), str(release / target))
    index.write_text(json.dumps({"weight_map": {k: target if v == shard else v for k, v in weight_map.items()}}))
    with pytest.raises(ValueError, match=f"model.safetensors.index.json names '{target}', which is outside") as e:
        load_pretrained(str(release))
    assert one_line(e)


def hub_cache(monkeypatch, root, repo, folder):
    """`folder` as the snapshot of Hub id `repo` in a Hub cache at `root` (offline: nothing is fetched)."""
    import huggingface_hub
    cache = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, cache / "snapshots" / "abc123")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return str(cache / "snapshots" / "abc123")


@pytest.mark.parametrize("field", ["vision_model_name_or_path", "llm_model_name_or_path"])
def test_base_models_named_by_an_original_checkpoint(release, tiny_llms, tiny_towers, tmp_path, monkeypatch, field):
    """The original records the base LLM / tower it trained from as given: an absolute local path for every locally
    trained run, or a Hub id. They are read from there (data the user chose: no code runs); a relative name that
    climbs out with '..' is refused; a path that does not exist is passed over (the folder's own files, defaults)."""
    llm = field == "llm_model_name_or_path"
    if llm:   # no tokenizer of its own: the one its config names is read
        for name in os.listdir(release):
            if name.startswith(("tokenizer", "special_tokens")):
                os.remove(release / name)
    base = str(tmp_path / "bases" / "mine")   # a base of its own: its processor's mean, its tokenizer's path show
    shutil.copytree(tiny_llms["llama"] if llm else tiny_towers["siglip"], base)
    if not llm:
        edit_json(os.path.join(base, "preprocessor_config.json"), image_mean=[0.25, 0.25, 0.25])
    snapshot = hub_cache(monkeypatch, tmp_path / "hub", "org/base", base)

    def read_from(value):
        edit_json(release / "config.json", **{field: value})
        _, tok, proc = load_pretrained(str(release))
        return tok.name_or_path if llm else list(proc.image_mean)
    assert read_from(base) == (base if llm else [0.25] * 3)                    # absolute: read (refused at ed39f35)
    assert read_from("org/base") == (snapshot if llm else [0.25] * 3)          # a Hub id: the local cache's
    if not llm:                                                                # the original's "kind:hub_id" too
        assert read_from("siglip:" + base) == [0.25] * 3
        assert read_from(base + "-gone") == [0.5] * 3                          # no such folder: SigLIP's defaults
    for climbing in (os.path.relpath(base), "../" * 12 + base.lstrip("/")):   # relative, out with '..': refused
        edit_json(release / "config.json", **{field: climbing})
        with pytest.raises(ValueError, match=r"config.json names '\.\./.*', a relative path that climbs out") as e:
            load_pretrained(str(release))
        assert one_line(e)


def test_convert_never_writes_into_its_source(saved, tmp_path, capsys):
    ours = str(tmp_path / "ours")
    shutil.copytree(saved, ours)
    before = {n: os.path.getmtime(os.path.join(ours, n)) for n in os.listdir(ours)}
    for cmd, dst in [("to-tinyllava", ours), ("to-llava", os.path.join(ours, "sub")), ("from-tinyllava", str(tmp_path)),
                     ("to-tinyllava", ours + "/.")]:
        with pytest.raises(SystemExit):
            convert.main([cmd, ours, dst, "--template", "llama"])
        assert "inside it or contains it" in capsys.readouterr().err
    assert {n: os.path.getmtime(os.path.join(ours, n)) for n in os.listdir(ours)} == before


# ---------------------------------------------------------------------------------------------- images
def test_padding_a_sliver_is_refused_before_it_costs_memory(tiny_towers, monkeypatch):
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(tiny_towers["siglip"])
    with pytest.raises(data.DataError, match=r"a 1x\d+ image cannot be padded") as e:
        data.preprocess_image(Image.new("RGB", (1, data.MAX_PAD_SIDE + 1)), proc, "pad")
    assert one_line(e)
    assert data.preprocess_image(Image.new("RGB", (1, data.MAX_PAD_SIDE + 1)), proc, "square").shape == (3, 32, 32)
    monkeypatch.setattr(images, "MAX_PAD_SIDE", 64)
    assert data.preprocess_image(Image.new("RGB", (64, 3)), proc, "pad").shape == (3, 32, 32)
    with pytest.raises(data.DataError):
        data.preprocess_image(Image.new("RGB", (65, 3)), proc, "pad")


def test_a_padded_sliver_is_a_bad_sample(tiny_llms, tiny_towers, monkeypatch, tmp_path):
    """Skipped under bad_samples="skip", one line naming the record under "error"."""
    from model import load_tokenizer
    from transformers import AutoImageProcessor
    monkeypatch.setattr(images, "MAX_PAD_SIDE", 64)
    Image.new("RGB", (65, 3)).save(tmp_path / "sliver.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "fine.png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    records = [{"id": n, "image": f"{n}.png", "conversations": turns} for n in ("sliver", "fine")]
    tok, proc = load_tokenizer(tiny_llms["llama"]), AutoImageProcessor.from_pretrained(tiny_towers["siglip"])
    args = (tok, proc, "llama", 4, 64)
    kw = dict(image_folder=str(tmp_path), image_aspect_ratio="pad")
    sample = data.VLMDataset(records, *args, bad_samples="skip", **kw)[0]
    assert sample["id"] == "fine" and sample["skipped"][0][1] == "sliver"
    with pytest.raises(data.DataError, match=r"record 0 \(id='sliver'\): .*a 65x3 image cannot be padded") as e:
        data.VLMDataset(records, *args, **kw)[0]
    assert one_line(e)


# ---------------------------------------------------------------------------------------------- failed writes
def full_disk(tmp, error=OSError(errno.ENOSPC, "No space left on device")):
    with open(tmp, "wb") as f:
        f.write(b"half")
    raise error


@pytest.mark.parametrize("error", [lambda: OSError(errno.ENOSPC, "No space left on device"),
                                   lambda: SafetensorError("Error while serializing: I/O error: No space left"),
                                   lambda: RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 5")])
def test_a_failed_save_names_the_file_and_leaves_no_half_file(tiny_llms, tiny_towers, tmp_path, monkeypatch, error):
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    out = str(tmp_path / "m")
    save_pretrained(model, tok, proc, out)   # a good save first: a failed one must not damage it
    good = open(os.path.join(out, "model.safetensors"), "rb").read()

    def failing(*args, **kwargs):
        with open(args[1], "wb") as f:   # (model|tensors, path): half a file, then the disk is full
            f.write(b"half")
        raise error()
    monkeypatch.setattr(model_module, "save_safetensors", failing)
    message = re.escape(f"could not write {out}/model.safetensors: ") + "(.*No space|.*unexpected pos)"
    with pytest.raises(OSError, match=message) as e:
        save_pretrained(model, tok, proc, out)
    assert one_line(e) and open(os.path.join(out, "model.safetensors"), "rb").read() == good
    monkeypatch.setattr(folders, "save_file", failing)
    with pytest.raises(OSError, match=re.escape(f"could not write {tmp_path}/sd/model.safetensors")):
        save_pretrained(model, tok, proc, str(tmp_path / "sd"), state_dict=model.state_dict())
    with pytest.raises(OSError, match=re.escape(f"could not write {tmp_path}/orig/model.safetensors")):
        convert.save_tinyllava(model, tok, proc, str(tmp_path / "orig"), "llama")
    for d in (out, str(tmp_path / "sd"), str(tmp_path / "orig")):
        assert not [n for n in os.listdir(d) if n.endswith(".tmp") or n.startswith(".save-")], d
    assert not os.path.exists(tmp_path / "sd" / "model.safetensors")


def test_failed_tokenizer_and_feature_writes_name_the_file(tiny_llms, tiny_towers, tmp_path, monkeypatch):
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    bare = Exception("No space left on device (os error 28)")   # what the tokenizers library raises
    monkeypatch.setattr(type(tok), "save_pretrained", lambda self, d, **kw: full_disk(os.path.join(d, "tokenizer.json"),
                                                                                       bare))
    out = tmp_path / "m"
    with pytest.raises(OSError, match=re.escape(f"could not write {out}: ") + ".*No space left on device") as e:
        save_pretrained(model, tok, proc, str(out))
    assert one_line(e) and sorted(os.listdir(out)) == ["config.json", "model.safetensors"]   # no half tokenizer

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    cache = FeatureCache(str(tmp_path / "cache"), model, proc)
    monkeypatch.setattr(folders, "save_file", lambda tensors, path, **kw: full_disk(path))
    with pytest.raises(OSError, match=r"could not write .*cache.*\.safetensors: .*No space left") as e:
        cache.fill(model, ["a.png"], str(tmp_path))
    assert one_line(e) and cache.load(str(tmp_path), "a.png") is None
    assert not [f for _, _, files in os.walk(cache.dir) for f in files]

"""Every flag of every script given bad values, as a user gives them: a real process each, which must end with exit
status 2 and one line on stderr (`<script>: error: ...`, naming the flag), never a traceback (issue #24). The values
are checked before torch loads: those cases run with a `torch` that cannot be imported (FAST), so a check that moved
after the heavy imports fails here, and 100+ processes take seconds. The few checks that need torch, a model or the
data run as they are (HEAVY). Also: both spellings of a flag, --help into a closed pipe, a --save that fails after
the conversation, and the lists settings.py keeps pinned to the code they name."""
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import settings
from conftest import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "train.py --config {cfg} --out_dir={run}"   # {run}: a folder of its own for each command
EVAL = "evaluate.py --model {model} --bench pope --data demo/eval --image-folder demo/images --template llama"
CHAT = "chat.py --model {model} --image {image} --prompt hi --max-new-tokens 2"
CHECK = "check_data.py {data} --image-folder {images}"

# (command, what the error line must name): each a bad value, or a bad combination, of one flag
FAST = [(f"{TRAIN} {arg}", said) for arg, said in [
    ("--epochs=nan", "--epochs"), ("--epochs=inf", "--epochs"), ("--epochs=1.5", "--epochs"),
    ("--max_steps=1e400", "--max_steps"), ("--max-steps=nan", "--max_steps"), ("--keep_checkpoints=inf", "--keep_c"),
    ("--lora_r=1e400", "--lora_r"), ("--max_nonfinite_steps=nan", "--max_nonfinite_steps"), ("--seed=1e30", "--seed"),
    ("--seed=-1", "--seed"), ("--lora_dropout=2", "--lora_dropout"), ("--dtype=banana", "--dtype"),
    ("--connector=banana", "--connector"), ("--connector=mlp0x_gelu", "--connector"),
    ("--vision_feature_layer=99", "--vision_feature_layer"), ("--vision_feature_layer=-9", "--vision_feature_layer"),
    ("--vision_feature_select_strategy=", "--vision_feature_select_strategy"),
    ("--image_aspect_ratio=", "--image_aspect_ratio"), ("--attn_implementation=banana", "--attn_implementation"),
    ("--bad_samples=", "--bad_samples"), ("--num_queries=0", "--num_queries"),
    ("--num_resampler_layers=0", "--num_resampler_layers"), ("--stages=[1]", "--stages"), ("--stages=[{}]", "--stages"),
    (""" "--stages=[{'name':'a'},{'name':'a'}]" """, "'a' is used twice"),
    (""" "--stages=[{'name':'x/y'}]" """, "a name (letters, digits, _) in every stage"),
    (""" "--stages=[{'name':'finetune','data':'nope'}]" """, "data_nope"),
    (""" "--stages=[{'name':'finetune','lr':-1}]" """, "stage finetune: lr"),
    (""" "--stages=[{'name':'finetune','tune_lm':'full'}]" """, "did you mean tune_llm"),
    (""" "--stages=[{'name':'finetune','tune_llm':'frozen','tune_connector':'frozen'}]" """, "every component is fr"),
    ("--lora_target_modules=[1]", "--lora_target_modules"), ("--lora_target_modules=q_proj", "--lora_target_modules"),
    ("--out_dir=", "--out_dir"), ("--out_dir=/proc/x", "--out_dir"), ("--out_dir={data}", "--out_dir"),
    ("--init_from=/nonexistent", "--init_from: no folder /nonexistent, and not a Hub id"),
    ("--llm=/nonexistent", "--llm: no folder /nonexistent, and not a Hub id"), ("--vision_tower=/nonexistent", "--vis"),
    ("--vision_tower2=/nonexistent", "--vision_tower2"), ("--tokenizer={data}", "--tokenizer"),
    ("--feature_cache=/proc/x", "--feature_cache"), ("--lora_alpha=-1", "--lora_alpha"), ("--qlora_bits=3", "--qlora"),
    ("--peak_flops=-1", "--peak_flops"), ("--peak_flops=inf", "--peak_flops"), ("--lr=nan", "--lr"),
    ("--lr=fast", "--lr"), ("--lr_llm=-1", "--lr_llm"), ("--weight_decay=-1", "--weight_decay"),
    ("--warmup_ratio=2", "--warmup_ratio"), ("--grad_clip=-1", "--grad_clip"), ("--micro_batch_size=0", "--micro"),
    ("--global_batch_size=0", "--global_batch_size"), ("--global_batch_size=6", "global_batch_size 6"),
    ("--bf16=maybe", "--bf16"), ("--gradient_checkpointing=sometimes", "--gradient_checkpointing"),
    ("--template=banana", "--template"), ("--tune_llm=partial:x", "--tune_llm"),
    ("--tune_connector=partial:1", "--tune_connector"), ("--tune_vision_tower=qlora", "--tune_vision_tower"),
    ("--recipe=banana", "--recipe"), ("--finetune.lr=-1", "--finetune.lr"), ("--nostage.lr=1", "no stage named"),
    ("--learning_rate=1", "did you mean lr"), ("--data_finetune=/nonexistent.json", "data_finetune"),
    ("--images_finetune=/nonexistent", "images_finetune"), ("--resume_allow=banana", "--resume_allow"),
    ("--feature_cache", "--feature_cache: needs a value"), ("--out-dir", "--out_dir: needs a value"),
    ("--finetune.lr", "--finetune.lr: needs a value"),
    ("--resume --overwrite", "--resume and --overwrite"), ("--config={yaml}", "a config is a Python file"),
    ("--config={yaml_py}", "NameError"), ("--config=/nonexistent.py", "--config"), ("--num_workers=-1", "--num_w"),
    ("--threads=-1", "--threads"), ("--val_every=-1", "--val_every"), ("--val_batches=0", "--val_batches"),
    ("--log_every=0", "--log_every"), ("--save_every=-1", "--save_every"), ("--max_length=0", "--max_length"),
    ("--legacy_patch_drop=2", "--legacy_patch_drop"), ("--trust_remote_code=maybe", "--trust_remote_code"),
    ("--allow_outside_images=x", "--allow_outside_images"), ("lr=1", "use --key=value"),
]] + [(f"{EVAL} {arg}", said) for arg, said in [
    ("--batch-size -3", "--batch-size"), ("--batch-size 1e8", "--batch-size"), ("--batch-size 100000000", "--batch"),
    ("--batch-size 0", "--batch-size"), ("--batch-size", "--batch-size"), ("--num-beams 0", "--num-beams"),
    ("--device banana", "--device"), ("--device cuda:x", "--device"), ("--temperature -1", "--temperature"),
    ("--temperature nan", "--temperature"), ("--top-p 5", "--top-p"), ("--top-p 0", "--top-p"),
    ("--max-new-tokens -1", "--max-new-tokens"), ("--max_new_tokens 1e400", "--max-new-tokens"),
    ("--limit 0", "--limit"), ("--limit -1", "--limit"), ("--threads 0", "--threads"), ("--dtype banana", "--dtype"),
    ("--template banana", "--template"), ("--out /proc/x", "--out"), ("--out {data}", "--out"),
    ("--judge-runs 0", "--judge-runs"), ("--questions /nonexistent.jsonl", "--questions"),
    ("--data /nonexistent", "--data"), ("--image-folder /nonexistent", "--image-folder"),
    ("--annotations /nonexistent", "--annotations"), ("--model /nonexistent", "--model"),
    ("--bench banana", "unknown benchmark"), ("--bench pope,gqa --questions {data}", "single --bench"),
    ("--bogus 1", "unrecognized arguments"),
]] + [("evaluate.py --bench pope --data demo/eval", "--model")] + [(f"{CHAT} {arg}", said) for arg, said in [
    ("--model /nonexistent", "--model"), ("--image /nonexistent.png", "--image"), ("--image {not_image}", "--image"),
    ("--image {images}", "--image"), ("--max-new-tokens 0", "--max-new-tokens"),
    ("--max-new-tokens -1", "--max-new-tokens"), ("--max_new_tokens 0", "--max-new-tokens"), ("--seed 1e30", "--seed"),
    ("--seed 99999999999999999999", "--seed"), ("--seed -1", "--seed"), ("--device banana", "--device"),
    ("--temperature -1", "--temperature"), ("--temperature nan", "--temperature"), ("--top-p 5", "--top-p"),
    ("--top_p inf", "--top-p"), ("--save /nonexistent/x.json", "--save"), ("--save {tmp}", "--save"),
    ("--save /proc/x.json", "--save"), ("--template banana", "--template"), ("--dtype banana", "--dtype"),
]] + [("chat.py --image {image}", "--model")] + [(f"convert.py {arg}", said) for arg, said in [
    ("to-llava /nonexistent {tmp}/o", "src: no folder /nonexistent, and not a Hub id"),
    ("to-llava {data} {tmp}/o", "src"), ("to-llava {model} /proc/x", "dst"), ("to-llava {model} {data}", "dst"),
    ("to-tinyllava {model} {tmp}/o --max-length -5", "--max-length"),
    ("to-tinyllava {model} {tmp}/o --max_length 0", "--max-length"),
    ("from-tinyllava {model} {tmp}/o --template banana", "--template"), ("banana {model} {tmp}/o", "command"),
    ("to-llava", "required"), ("to-llava {model} {tmp}/o --bogus", "unrecognized arguments"),
]] + [(f"{CHECK} {arg}".replace("{data} /", "/"), said) for arg, said in [
    ("/nonexistent.json", "data"), ("--config /nonexistent.py", "--config"), ("--config {nan_cfg}", "epochs"),
    ("--config {yaml}", "a config is a Python file"), ("--config {bad_llm_cfg}", "llm: no folder /nonexistent"),
    ("--config {cfg} --stage nope", "--stage"), ("--model /nonexistent", "--model"), ("--model {tmp}", "--model"),
    ("--model {llm}", "--model"), ("--tokenizer /nonexistent --num-image-tokens 4", "--tokenizer"),
    ("--tokenizer {llm}", "--num-image-tokens"), ("--template banana", "--template"),
    ("--num-image-tokens -1", "--num-image-tokens"), ("--max-length 0", "--max-length"),
    ("--max_length 0", "--max-length"), ("--show -2", "--show"), ("--image-aspect-ratio banana", "--image-aspect"),
    ("--image-folder /nonexistent", "--image-folder"),
]] + [(f"demo.py {arg}", said) for arg, said in [
    ("--eval_images=x", "--eval_images"), ("--eval-images 0", "--eval-images"), ("--bogus=1", "unknown config key"),
    ("--max-steps=nan", "--max_steps"), ("--finetune.lr=-1", "--finetune.lr"), ("--resume=maybe", "--resume"),
]]

# checked where they can only be: with the model built, the data read, torch imported
HEAVY = [
    (f"{TRAIN} --global_batch_size=64 --check_data_at_start=false", "samples make less than one global batch of 64"),
    (f"{TRAIN} --data_finetune={{bad_data}} --check_data_at_start=false", "image-missing"),   # met in training
    (f"{TRAIN} --tracker=banana", "--tracker=banana: unknown tracker"),
    (f"{EVAL} --device cuda", "--device: cuda, but this machine has no CUDA device"),
    (f"{CHAT} --device cuda:1", "--device: cuda:1"),
]
# a bad record met by the start-up check (bad_samples=error, the default): listed as found, then the one error line
LISTED = [(f"{TRAIN} --data_finetune={{bad_data}}", "1 of 4 records bad (image-missing 1)")]


@pytest.fixture(scope="module")
def places(tiny_llms, tiny_towers, tmp_path_factory):
    """The files every command names: a tiny saved model, data, configs good and bad, and a torch that fails."""
    from model import ModelArgs, build_model, save_pretrained
    root = tmp_path_factory.mktemp("flags")
    data, images = write_dataset(str(root / "data"))
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    save_pretrained(model, tok, proc, str(root / "model"))
    (root / "model" / "train_config.json").write_text(json.dumps({"template": "llama"}))
    with open(data) as f:
        records = json.load(f)[:3]
    records.append({"id": "broken", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]})
    (root / "bad.json").write_text(json.dumps(records))
    Image.new("RGB", (40, 24), (200, 0, 0)).save(root / "image.png")
    (root / "not_image.png").write_text("not an image")
    (root / "cfg.py").write_text(
        f"llm = {tiny_llms['llama']!r}\nvision_tower = {tiny_towers['siglip']!r}\ndata_finetune = {data!r}\n"
        f"images_finetune = {images!r}\nstages = [dict(name='finetune', data='finetune', tune_llm='full')]\n"
        "global_batch_size = 4\nmicro_batch_size = 4\nmax_steps = 1\nbf16 = False\nnum_workers = 0\nthreads = 1\n"
        "template = 'llama'\nmax_length = 256\n")
    (root / "c.yaml").write_text("model_name_or_path: microsoft/phi-2\nlearning_rate: 2e-5\n")
    (root / "yaml_in.py").write_text("model_name_or_path: microsoft/phi-2\n")
    (root / "nan.py").write_text("epochs = float('nan')\n")
    (root / "bad_llm.py").write_text(f"llm = '/nonexistent'\nvision_tower = {tiny_towers['siglip']!r}\n")
    (root / "notorch" / "torch").mkdir(parents=True)
    (root / "notorch" / "torch" / "__init__.py").write_text(
        "raise ImportError('torch was imported before the values were checked')\n")
    (root / "tmp").mkdir()
    return dict(model=str(root / "model"), data=data, images=images, bad_data=str(root / "bad.json"),
                image=str(root / "image.png"), not_image=str(root / "not_image.png"), cfg=str(root / "cfg.py"),
                yaml=str(root / "c.yaml"), yaml_py=str(root / "yaml_in.py"), nan_cfg=str(root / "nan.py"),
                bad_llm_cfg=str(root / "bad_llm.py"), llm=tiny_llms["llama"], tmp=str(root / "tmp"),
                notorch=str(root / "notorch"))


def run_all(cases, places, torch_ok):
    """Each command as a process, 3 at a time: [(command, returncode, stdout, stderr)]."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if not torch_ok:
        env["PYTHONPATH"] = os.pathsep.join([places["notorch"], env.get("PYTHONPATH", "")])

    def one(i_case):
        i, case = i_case
        where = dict(places, run=os.path.join(places["tmp"], f"run{i}"))
        words = [re.sub(r"\{(\w+)\}", lambda m: where.get(m[1], m[0]), w) for w in shlex.split(case[0])]
        p = subprocess.run([sys.executable, *words], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return " ".join(words), p.returncode, p.stdout, p.stderr
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(one, enumerate(cases)))


def wrong(case, result, listed=False):
    """What is wrong with how the command ended ('' if nothing)."""
    command, code, out, err = result
    script = command.split()[0]
    lines = err.strip().splitlines()
    errors = [line for line in lines if re.match(rf"{re.escape(script)}( [\w-]+)?: error: ", line)]
    if code != 2 or "Traceback" in err or len(errors) != 1 or not (listed or len(lines) == 1):
        return f"exit {code}, stderr:\n{err[-1500:]}"
    if case[1] not in errors[0]:
        return f"the error does not say {case[1]!r}: {errors[0]}"
    return ""


def test_each_bad_value_is_one_line_and_exit_2_before_torch_loads(places):
    assert len(FAST) + len(HEAVY) + len(LISTED) >= 100
    results = run_all(FAST, places, torch_ok=False)
    failed = [f"{r[0]}\n  {w}" for case, r in zip(FAST, results) if (w := wrong(case, r))]
    assert not failed, f"{len(failed)} of {len(FAST)}:\n" + "\n".join(failed)


def test_the_checks_that_need_torch_a_model_or_the_data(places):
    """What only torch, the model or the data can tell, in one pool with a --save that fails after the conversation
    (its folder was checked before the model loaded; /dev/full is full): one line naming where the conversation is."""
    save = [(f"{CHAT} --save /dev/full", "")] * os.path.exists("/dev/full")
    *results, saved = run_all(HEAVY + LISTED + save, places, torch_ok=True) + [None] * (not save)
    failed = [f"{r[0]}\n  {w}" for case, r in zip(HEAVY + LISTED, results) if (w := wrong(case, r, case in LISTED))]
    assert not failed, f"{len(failed)} of {len(HEAVY) + len(LISTED)}:\n" + "\n".join(failed)
    listed = results[-1][3].strip().splitlines()
    assert listed[0].startswith(f"{places['bad_data']}: record 3 (id='broken'): cannot read image") and len(listed) == 2
    if saved is None:
        pytest.skip("no /dev/full here: the failed save is not tried")
    command, code, out, err = saved
    m = re.fullmatch(r"chat\.py: error: --save: cannot write /dev/full \(No space left on device\); the conversation "
                     r"is in (\S+\.json)", err.strip())
    assert code == 2 and m, err[-1500:]
    with open(m[1]) as f:
        kept = json.load(f)
    os.remove(m[1])
    assert kept["image"] == places["image"] and kept["conversations"][0]["value"] == "<image>\nhi"
    assert f"ASSISTANT: {kept['conversations'][1]['value']}" in out


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "chat.py", "convert.py", "check_data.py", "demo.py"])
def test_help_into_a_closed_pipe_ends_quietly(script):
    """`script --help | head`: the reader goes away; no BrokenPipeError, exit 0."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, stdout=w, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    finally:
        os.close(w)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_both_spellings_of_a_flag():
    import recipes
    assert recipes.load_config(["--max-steps=3", "--finetune.micro-batch-size", "2"])["max_steps"] == 3
    p = settings.Parser(prog="x")
    p.add_argument("--max-new-tokens", type=settings.Int(1))
    assert p.parse_args(["--max_new_tokens", "5"]).max_new_tokens == 5
    assert p.parse_args(["--max_new_tokens=6"]).max_new_tokens == 6
    assert p.parse_args(["--max-new-tokens", "7"]).max_new_tokens == 7


def test_the_lists_settings_keeps_are_the_codes_own():
    """settings.py names templates, dtypes, connectors and train.py's keys without importing the modules that
    define them (so that values are checked before torch loads): the same as theirs."""
    import connectors
    import data
    import model
    import recipes
    assert set(settings.TEMPLATES) == set(data.TEMPLATES) and set(settings.DTYPES) == set(model.DTYPES)
    assert set(settings.TRAIN) == set(recipes.DEFAULTS) and set(recipes.RULES) == set(recipes.DEFAULTS)
    for key, default in recipes.DEFAULTS.items():   # every default passes its own rule, unchanged
        assert recipes.RULES[key].check(key, default, disk=False) == default, key
    for name in ("identity", "linear", "mlp2x_gelu", "mlp3x_gelu", "qformer", "resampler", "pixel_shuffle2_mlp2x_gelu"):
        settings.CONNECTOR.parse(name)
        connectors.build_connector(name, 8, 8, num_queries=2, num_layers=1, qformer_hidden=8, qformer_heads=2,
                                   qformer_layers=1, qformer_ffn=8)


@pytest.mark.parametrize("name,hub", [("microsoft/phi-2", True), ("gpt2", True), ("/nonexistent", False),
                                      ("./x", False), ("a/b/c", False), ("a--b/c", False), ("org/name.", False)])
def test_what_counts_as_a_hub_id(name, hub):
    assert settings.is_hub_id(name) is hub


def test_each_rule_takes_its_values_and_says_what_it_expected(tmp_path):
    """The rules in this process (the commands above run them in their own): what each accepts, what it returns."""
    S = settings
    good = [(S.Int(1), "1e3", 1000), (S.Int(0, S.SEED_MAX), 7.0, 7), (S.Int(0, also=(-1,)), "-1", -1),
            (S.Float(0, 1), "1", 1.0), (S.Float(above=0, below=1), 0.5, 0.5), (S.Bool(), "no", False),
            (S.Bool(also=("auto",)), "AUTO", "auto"), (S.Choice(4, 8), "8", 8),
            (S.CONNECTOR, "mlp3x_gelu", "mlp3x_gelu"), (S.Names(), "['q_proj']", ["q_proj"]),
            (S.Stages(), [{"name": "a"}], [{"name": "a"}]),
            (S.Text(), tmp_path, str(tmp_path)), (S.Model(empty=True), "", ""), (S.Model(), "org/name", "org/name"),
            (S.Folder(), str(tmp_path), str(tmp_path)), (S.Exists(), str(tmp_path), str(tmp_path)),
            (S.Output(), str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b")), (S.Device(), "cuda:1", "cuda:1")]
    for rule, value, want in good:
        assert rule.parse(value) == want, (rule, value)
    (tmp_path / "f").write_text("x")
    Image.new("RGB", (4, 4)).save(tmp_path / "i.png")
    assert S.Image().parse(str(tmp_path / "i.png")) and S.Output(folder=False).parse(str(tmp_path / "f"))
    bad = [(S.Int(1), "0", "expected a whole number >= 1, got '0'"), (S.Int(), True, "got True"),
           (S.Int(), "1e400", "got '1e400'"), (S.Int(), [1], "got [1]"), (S.Float(0), "nan", ">= 0, got 'nan'"),
           (S.Float(above=0, high=1), "0", "> 0 and <= 1"), (S.Float(), None, "got None"),
           (S.Bool(), "maybe", "expected true/false"), (S.Choice("", "x"), "y", "one of '', x"),
           (S.Text(), 3, "a string"), (S.Names(), "[", "a list of names"), (S.Stages(), "x", "a list of stages"),
           (S.Stages(), [{"name": "a", 1: 2}], "a list of stages"),
           (S.File(), str(tmp_path), "is a folder, not a file"), (S.File(), str(tmp_path / "no"), "no file"),
           (S.Folder(), str(tmp_path / "f"), "is a file, not a folder"), (S.Exists(), str(tmp_path / "no"), "no file"),
           (S.Image(), str(tmp_path / "f"), "is not an image"), (S.Model(), str(tmp_path / "f"), "not a model folder"),
           (S.Model(), "", "got ''"), (S.Output(), "", "a folder that can be written, got ''"),
           (S.Output(), str(tmp_path / "f" / "x"), "is a file"), (S.Output(), str(tmp_path / "f"), "not a folder"),
           (S.Output(folder=False), str(tmp_path), "is a folder"), (S.Output(), "/proc/x/y", "cannot make a file in /proc"),
           (S.Device(), "gpu", "expected cpu, cuda")]
    for rule, value, said in bad:
        with pytest.raises(ValueError) as e:
            rule.parse(value)
        assert said in str(e.value), (rule, value, str(e.value))
    with pytest.raises(S.ConfigError, match=r"^--x: expected a whole number >= 1, got '0'$"):
        S.Int(1).check("--x", "0")
    assert S.Model().check("--llm", "/nonexistent", disk=False) == "/nonexistent"   # train.py: looked at later
    assert S.Device.missing(None) is None and S.Device.missing("cpu") is None
    import torch
    if not torch.cuda.is_available():
        assert S.Device.missing("cuda").startswith("--device: cuda, but this machine has no CUDA device")
    assert S.tower_layers(str(tmp_path)) is None

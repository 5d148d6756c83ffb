"""configs/: every training config loads and resolves, its batch arithmetic works out for the GPU counts its header
names, its header's numbers are Table 1's, and the Accelerate / DeepSpeed files parse into what they claim."""
import glob
import json
import os
import re

import pytest

import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
ACCEL = os.path.join(ROOT, "configs", "accelerate")
GPUS_FALLBACK = {"demo.py": [1]}   # configs without a "# gpus: N ..." header line

# TinyLLaVA Factory README, Table 1 (shared/reference/tinyllava_factory.md §6.6):
# VQAv2, GQA, SQA-I, TextVQA, MM-Vet, POPE, MME, MMMU-val
METRICS = ("VQAv2", "GQA", "SQA-I", "TextVQA", "MM-Vet", "POPE", "MME", "MMMU-val")
TABLE1 = {
    "siglip phi-2 share": (80.1, 62.1, 73.0, 60.3, 37.5, 87.2, 1466.4, 38.4),
    "siglip phi-2 base": (79.2, 61.6, 71.9, 57.4, 35.0, 87.2, 1462.4, 38.2),
    "siglip phi-2 base&lora": (77.6, 59.7, 71.6, 53.8, 33.3, 87.9, 1413.2, 35.6),
    "clip phi-2 base": (76.8, 59.4, 71.2, 53.4, 31.7, 86.8, 1448.6, 36.3),
    "siglip gemma-2b-it": (78.4, 61.6, 64.4, 53.6, 26.9, 86.4, 1339.0, 31.7),
    "siglip stablelm-2-zephyr-1.6b": (78.2, 60.7, 66.7, 56.0, 29.4, 86.3, 1319.3, 32.6),
    "siglip tinyllama-1.1b-chat": (75.5, 58.6, 64.0, 49.6, 23.5, 86.3, 1256.5, 28.3),
    "siglip qwen2.5-3b": (79.4, 62.5, 74.1, 58.3, 34.8, 87.4, 1438.7, 39.9),
    "siglip qwen2.5-0.5b": (75.3, 59.5, 60.3, 48.3, 23.9, 86.1, 1253.0, 33.3),
    "siglip qwen2-0.5b": (72.3, 55.8, 60.1, 45.2, 19.5, 86.6, 1153.0, 29.7),
    "siglip openelm-450m-instruct": (71.7, 53.9, 54.1, 44.0, 20.0, 85.4, 1118.8, 24.0),
}


def header(path):
    with open(path) as f:
        return [line for line in f.read().splitlines() if line.startswith("#")]


def gpu_counts(path):
    for line in header(path):
        m = re.match(r"#\s*gpus:\s*([\d ]+)\s*$", line)
        if m:
            return [int(n) for n in m.group(1).split()]
    name = os.path.basename(path)
    assert name in GPUS_FALLBACK, f"{name}: add a '# gpus: N [N ...]' header line (the GPU counts of its batch math)"
    return GPUS_FALLBACK[name]


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"phi2_siglip_base.py", "phi2_siglip_share.py", "phi2_siglip_lora.py", "phi2_siglip_qlora.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_batches_divide(path):
    cfg = train.load_config(["--config", path])
    stages = train.stage_configs(cfg)
    assert stages, "a config resolves to at least one stage"
    for s in stages:
        assert s["template"] in data.TEMPLATES, f"stage {s['stage']}: template {s['template']!r}"
        assert s[f"data_{s['data']}"], f"stage {s['stage']} reads data_{s['data']}, which the config leaves empty"
        g, mb = s["global_batch_size"], s["micro_batch_size"]
        assert g % mb == 0, f"stage {s['stage']}: global {g} is not a multiple of micro {mb}"
        for n in gpu_counts(path):
            accum = g // (mb * n)
            assert accum >= 1 and accum * mb * n == g, \
                f"stage {s['stage']}: {g} != {mb} per GPU x {n} GPUs x an integer accumulation"
    assert cfg["template"] in data.TEMPLATES


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_header_says_hardware_expectation_and_true_arithmetic(path):
    text = "\n".join(header(path))
    assert re.search(r"hardware", text, re.I) and re.search(r"expected", text, re.I), \
        "a config header says its hardware and expected result (reference/style.md point 4)"
    for g, m, n, a in re.findall(r"\b(\d+) = (\d+) x (\d+) x (\d+)\b", text):
        assert int(g) == int(m) * int(n) * int(a), f"header arithmetic {g} = {m} x {n} x {a} is wrong"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_header_numbers_are_table1_rows(path):
    """Every benchmark line block in a header is one whole row of Table 1; every MME quoted is one of its MMEs."""
    text = "\n".join(header(path))
    found = dict(re.findall(r"\b(VQAv2|GQA|SQA-I|TextVQA|MM-Vet|POPE|MMMU-val) (\d+\.\d)\b", text))
    mmes = [float(x) for x in re.findall(r"\bMME (\d+\.\d)\b", text)]
    if found:
        row = tuple(float(found[k]) for k in METRICS if k != "MME")
        assert mmes, "a Table 1 row quotes its MME"
        assert any(row == tuple(v for k, v in zip(METRICS, r) if k != "MME") and mmes[0] == r[6]
                   for r in TABLE1.values()), f"{row} MME {mmes[0]} is not a row of Table 1"
    assert set(mmes) <= {r[6] for r in TABLE1.values()}, f"MME {mmes} not in Table 1"


def test_out_dirs_are_distinct():
    outs = [train.load_config(["--config", p])["out_dir"] for p in CONFIGS]
    assert len(set(outs)) == len(outs), "two configs would write to the same out_dir"


def test_phi2_siglip_base_is_the_paper_setting():
    cfg = train.load_config(["--config", os.path.join(ROOT, "configs", "phi2_siglip_base.py")])
    assert cfg["llm"] == "microsoft/phi-2"
    assert cfg["vision_tower"] == "google/siglip-so400m-patch14-384"
    assert cfg["connector"] == "mlp2x_gelu" and cfg["recipe"] == "base" and cfg["template"] == "phi"
    assert cfg["max_length"] == 3072 and cfg["gradient_checkpointing"] and cfg["bf16"] and not cfg["fp16"]
    assert cfg["vision_feature_layer"] == -2 and cfg["image_aspect_ratio"] == "square"
    pre, fin = train.stage_configs(cfg)
    keys = ("stage", "template", "tune_llm", "tune_vision_tower", "tune_connector", "lr", "global_batch_size")
    assert tuple(pre[k] for k in keys) == ("pretrain", "pretrain", "frozen", "frozen", "full", 1e-3, 256)
    assert tuple(fin[k] for k in keys) == ("finetune", "phi", "full", "frozen", "full", 2e-5, 128)


def test_readme_lists_every_config():
    with open(os.path.join(ROOT, "configs", "README.md")) as f:
        readme = f.read()
    for p in CONFIGS + glob.glob(os.path.join(ACCEL, "*")):
        assert os.path.basename(p) in readme, f"configs/README.md does not mention {os.path.basename(p)}"


# ----------------------------------------------------------------------------- accelerate / deepspeed files
DS_STAGE = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
YAML_TYPE = {"1gpu.yaml": "NO", "ddp.yaml": "MULTI_GPU", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED",
             "zero3_offload.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP", "two_nodes.yaml": "DEEPSPEED"}


@pytest.mark.parametrize("name", sorted(DS_STAGE))
def test_deepspeed_json(name):
    with open(os.path.join(ACCEL, name)) as f:
        ds = json.load(f)
    z = ds["zero_optimization"]
    assert z["stage"] == DS_STAGE[name]
    for k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert ds[k] == "auto", f"{k}: train.py's config decides the batch, not the json"
    assert ds["fp16"]["enabled"] == "auto" and ds["bf16"]["enabled"] == "auto"
    # Accelerate fills these "auto" values from model.config.hidden_size; our TinyLlava model has no .config
    # ("Can't find `model.config` entry"), so they are numbers (what "auto" gives for hidden 2560, phi-2).
    for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert z.get(k) != "auto", f"zero_optimization.{k} must not be 'auto' (no model.config)"
    if z["stage"] == 3:
        assert z["stage3_gather_16bit_weights_on_model_save"] is True
    offload = "offload" in name
    assert (z.get("offload_optimizer", {}).get("device") == "cpu") == offload
    assert (z.get("offload_param", {}).get("device") == "cpu") == offload


def test_accelerate_yamls_parse_and_name_real_options():
    yaml = pytest.importorskip("yaml")   # PyYAML comes with accelerate
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    dests = {a.dest for a in launch_command_parser()._actions}
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ACCEL, "*.yaml")))
    assert names == sorted(YAML_TYPE)
    for name in names:
        path = os.path.join(ACCEL, name)
        with open(path) as f:
            raw = yaml.safe_load(f)
        assert isinstance(raw, dict)
        cfg = ClusterConfig.from_yaml_file(path)   # raises on unknown top-level keys
        assert cfg.distributed_type.value == YAML_TYPE[name], name
        assert not cfg.use_cpu, f"{name}: use_cpu starts ONE process (see ddp.yaml for the CPU command)"
        # nested keys become launch options; a misspelt one is silently ignored by `accelerate launch`
        for key in list(cfg.deepspeed_config) + list(cfg.fsdp_config):
            assert key in dests, f"{name}: {key!r} is not an `accelerate launch` option"
        if cfg.deepspeed_config:
            ds_file = os.path.join(ROOT, cfg.deepspeed_config["deepspeed_config_file"])
            assert os.path.isfile(ds_file), f"{name}: {ds_file} (relative to the repository root) not found"
            assert cfg.deepspeed_config.get("zero3_init_flag") is False
        if cfg.fsdp_config:
            assert str(cfg.fsdp_config["fsdp_version"]) == "2"
            assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        if name == "two_nodes.yaml":
            assert cfg.num_machines == 2 and cfg.num_processes == 16
        elif name != "1gpu.yaml":
            assert cfg.num_processes == 8 and cfg.num_machines == 1
    with open(os.path.join(ACCEL, "ddp.yaml")) as f:
        assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in f.read()

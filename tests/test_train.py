"""train.py and recipes.py on tiny models: config handling, freezing, LoRA/QLoRA, token-normalised accumulation,
resume, and stage hand-over."""
import json
import os

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import write_dataset

import train
from model import ModelArgs, build_model, load_pretrained
from recipes import ConfigError, apply_recipe


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


def run_args(tiny_llms, tiny_towers, dataset, out, *extra, family="llama"):
    data, images = dataset
    return [f"--llm={tiny_llms[family]}", f"--vision_tower={tiny_towers['siglip']}", f"--template={family}",
            f"--data_finetune={data}", f"--images_finetune={images}", f"--data_pretrain={data}",
            f"--images_pretrain={images}", f"--out_dir={out}", "--bf16=false", "--num_workers=0",
            "--warmup_ratio=0", "--lr=1e-3", "--max_length=256", *extra]


# ----------------------------------------------------------------------------- config
def test_config_file_overrides_and_coercion(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\nlr = 3e-4\nmicro_batch_size = 2\n_private = 1\n")
    cfg = train.load_config(["--config", str(cfg_file), "--bf16=false", "--lr=1", "--finetune.lr=5e-5",
                             "--resume", "--stages=[{'name': 'x'}]"])
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    assert cfg["bf16"] is False and cfg["resume"] is True and cfg["micro_batch_size"] == 2
    assert cfg["stage_overrides"] == {"finetune": {"lr": 5e-5}}
    assert cfg["stages"] == [{"name": "x"}]


@pytest.mark.parametrize("argv,match", [
    (["--learning_rate=1"], "unknown config key 'learning_rate'"),
    (["--micro_batch=2"], "did you mean micro_batch_size"),
    (["--bf16=maybe"], "expected true/false"),
    (["--epochs=1.5"], "expected a whole number"),
    (["--lr=fast"], "expected a number"),
    (["lr=1"], "use --key=value"),
])
def test_config_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        train.load_config(argv)


def test_config_file_unknown_key_names_the_file(tmp_path):
    cfg_file = tmp_path / "bad.py"
    cfg_file.write_text("tune_lm = 'full'\n")
    with pytest.raises(ValueError, match=r"bad.py: unknown config key 'tune_lm'; did you mean tune_llm"):
        train.load_config(["--config", str(cfg_file)])


def test_stage_configs_apply_recipe_then_stage_overrides():
    cfg = train.load_config(["--recipe=base", "--finetune.lr=1e-4", "--micro_batch_size=2"])
    pre, fin = train.stage_configs(cfg)
    assert (pre["stage"], pre["template"], pre["lr"], pre["tune_llm"], pre["global_batch_size"]) == \
        ("pretrain", "pretrain", 1e-3, "frozen", 256)
    assert (fin["stage"], fin["template"], fin["lr"], fin["tune_llm"], fin["global_batch_size"]) == \
        ("finetune", "phi", 1e-4, "full", 128)
    assert fin["micro_batch_size"] == 2
    with pytest.raises(ValueError, match="no stage named 'share'"):
        train.stage_configs(train.load_config(["--share.lr=1"]))


# ----------------------------------------------------------------------------- recipes
def counts(model):
    def n(m, trainable):
        return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
    return {c: (n(m, True), n(m, False)) for c, m in
            (("llm", model.language_model), ("vision_tower", model.vision_tower), ("connector", model.connector))}


def recipe_cfg(**kw):
    cfg = dict(train.DEFAULTS)
    cfg.update(kw)
    return cfg


def test_tune_types_freeze_exactly(tiny_llms, tiny_towers):
    model, _, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    apply_recipe(model, recipe_cfg(tune_llm="frozen", tune_vision_tower="frozen", tune_connector="full"))
    c = counts(model)
    assert c["llm"][0] == 0 and c["vision_tower"][0] == 0 and c["connector"][0] == c["connector"][1] > 0

    apply_recipe(model, recipe_cfg(tune_llm="full", tune_vision_tower="partial:1", tune_connector="frozen"))
    c = counts(model)
    assert c["llm"][0] == c["llm"][1] and c["connector"][0] == 0
    # SigLIP keeps layers 0..1 of 3 (feature layer -2): partial:1 trains exactly encoder layer 1
    layer1 = sum(p.numel() for n, p in model.vision_tower.named_parameters() if ".layers.1." in n)
    assert c["vision_tower"][0] == layer1 > 0

    apply_recipe(model, recipe_cfg(tune_llm="partial:1", tune_vision_tower="frozen", tune_connector="full"))
    lm = model.language_model
    expected = sum(p.numel() for n, p in lm.named_parameters() if ".layers.1." in n or n in ("model.norm.weight",
                                                                                             "lm_head.weight"))
    assert counts(model)["llm"][0] == expected


def test_lora_wraps_every_linear_except_heads(tiny_llms, tiny_towers):
    model, _, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    total_before = counts(model)["llm"][1]
    apply_recipe(model, recipe_cfg(tune_llm="lora", lora_r=4, lora_alpha=8, tune_vision_tower="lora",
                                   tune_connector="full"))
    lm = model.language_model
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in lm.named_parameters() if "lora_A" in n}
    # 2 layers x (q, k, v, o, gate, up, down); never lm_head
    assert len(adapted) == 14 and not any("lm_head" in n for n in adapted)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    h, inter = 64, 128
    # q,o: h->h; k,v: h->32 (2 kv heads x 16); gate, up: h->inter; down: inter->h; r=4
    per_layer = 4 * (h + h) * 2 + 4 * (h + 32) * 2 + 4 * (h + inter) * 2 + 4 * (inter + h)
    assert counts(model)["llm"][0] == 2 * per_layer
    assert counts(model)["llm"][1] == total_before + 2 * per_layer
    assert all("lora_" in n for n, p in model.vision_tower.named_parameters() if p.requires_grad)


def test_bad_tune_types(tiny_llms, tiny_towers):
    model, _, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    for kw, match in [(dict(tune_llm="half"), "valid"), (dict(tune_connector="partial:2"), "not the connector"),
                      (dict(tune_vision_tower="qlora"), "LLM only")]:
        with pytest.raises(ValueError, match=match):
            apply_recipe(model, recipe_cfg(**kw))


# ----------------------------------------------------------------------------- the loop
def finetune(tiny_llms, tiny_towers, dataset, out, *extra, family="llama"):
    args = run_args(tiny_llms, tiny_towers, dataset, out, "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]",
                    *extra, family=family)
    AcceleratorState._reset_state(True)
    return train.main(args)


@pytest.mark.parametrize("threads", [1, 2])
def test_accumulation_equals_big_batch(tiny_llms, tiny_towers, dataset, tmp_path, threads):
    """One optimizer step: 4 micro-batches of 1 == 1 batch of 4, because the loss is normalised by the
    supervised tokens of the whole step (per-micro-batch means would weight short answers more). Compared where
    rounding cannot flip the result: the loss, the gradients the optimizer is handed, and the step itself wherever
    the gradient is clearly away from zero (Adam's first step is lr * g / (|g| + eps), about lr * sign(g): a
    gradient within rounding of zero may change sign with the summation order, i.e. with the CPU or thread count)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    common = ["--global_batch_size=4", "--max_steps=1", "--group_by_length=false", "--grad_clip=0",
              f"--threads={threads}"]
    runs = []
    for name, micro in (("a", 1), ("b", 4)):
        seen = {}
        pre = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.update(
            grads=[p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None],
            before=[p.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
        post = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.update(
            after=[p.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
        try:
            _, losses = finetune(tiny_llms, tiny_towers, dataset, tmp_path / name, f"--micro_batch_size={micro}",
                                 *common)
        finally:
            pre.remove()
            post.remove()
        runs.append((losses["finetune"], seen))
    (loss_a, a), (loss_b, b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert len(a["grads"]) == len(b["grads"]) > 10
    scale = max(float(g.abs().max()) for g in a["grads"])
    moved = 0
    for ga, gb, p0, pa, pb in zip(a["grads"], b["grads"], a["before"], a["after"], b["after"]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * scale)   # summation order only (~3e-7 here)
        clear = ga.abs() > 1e-4 * scale      # far from zero: both runs step the same way
        torch.testing.assert_close(pa[clear], pb[clear], rtol=1e-5, atol=1e-7)
        moved += int((pa[clear] != p0[clear]).sum())
    assert moved > 1000


def test_loss_falls_and_resume_matches(tiny_llms, tiny_towers, dataset, tmp_path, monkeypatch):
    common = ["--global_batch_size=4", "--micro_batch_size=2", "--max_steps=6", "--save_every=2",
              "--keep_checkpoints=2"]
    _, full = finetune(tiny_llms, tiny_towers, dataset, tmp_path / "full", *common)
    losses = full["finetune"]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])

    real_save = train.save_checkpoint

    def crash_after_second_save(accelerator, work_dir, step, *args):
        real_save(accelerator, work_dir, step, *args)
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(train, "save_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_llms, tiny_towers, dataset, tmp_path / "cut", *common)
    ckpts = sorted(os.listdir(tmp_path / "cut" / "1_finetune.partial" / "checkpoints"))
    assert ckpts == ["step_00000002", "step_00000004"]
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    _, resumed = finetune(tiny_llms, tiny_towers, dataset, tmp_path / "cut", *common, "--resume")
    assert resumed["finetune"] == pytest.approx(losses[4:], rel=1e-5)
    m1, _, _ = load_pretrained(str(tmp_path / "full" / "1_finetune"))
    m2, _, _ = load_pretrained(str(tmp_path / "cut" / "1_finetune"))
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6, msg=k)


def test_two_stage_recipe_hands_over_the_connector(tiny_llms, tiny_towers, dataset, tmp_path):
    out = tmp_path / "base"
    args = run_args(tiny_llms, tiny_towers, dataset, out, "--recipe=base", "--global_batch_size=4",
                    "--micro_batch_size=4", "--max_steps=2", "--finetune.tune_connector=frozen",
                    "--pretrain.global_batch_size=4", "--finetune.global_batch_size=4")
    final, _ = train.main(args)
    pre, _, _ = load_pretrained(str(out / "1_pretrain"))
    fin, _, _ = load_pretrained(final)
    fresh, _, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    for k, v in pre.connector.state_dict().items():
        assert not torch.equal(v, fresh.connector.state_dict()[k])     # stage 1 trained it
        assert torch.equal(v, fin.connector.state_dict()[k])            # stage 2 started from it (and froze it)
    assert any(not torch.equal(a, b) for a, b in zip(pre.language_model.state_dict().values(),
                                                     fin.language_model.state_dict().values()))
    with open(out / "2_finetune" / "train_config.json") as f:
        assert json.load(f)["template"] == "llama"


@pytest.mark.parametrize("tune", ["lora", "qlora"])
def test_lora_and_qlora_steps_on_cpu(tiny_llms, tiny_towers, dataset, tmp_path, tune):
    out = tmp_path / tune
    args = run_args(tiny_llms, tiny_towers, dataset, out, "--recipe=base", "--max_steps=2", "--micro_batch_size=2",
                    "--pretrain.global_batch_size=4", "--finetune.global_batch_size=4", f"--recipe={tune}",
                    "--lora_r=4", "--lora_alpha=8", "--finetune.lr=1e-2")
    final, res = train.main(args)
    assert all(torch.isfinite(torch.tensor(res["finetune"])))
    assert os.path.isfile(os.path.join(final, "adapter_llm", "adapter_config.json"))
    merged, _, _ = load_pretrained(final)          # a plain model: adapters merged onto the full-precision base
    pre, _, _ = load_pretrained(str(out / "1_pretrain"))
    diffs = [float((a - b).abs().max()) for a, b in zip(merged.language_model.state_dict().values(),
                                                        pre.language_model.state_dict().values())]
    assert max(diffs) > 0                           # the adapters changed the LLM


def test_resume_inside_a_later_stage(tiny_llms, tiny_towers, dataset, tmp_path, monkeypatch):
    """A crash in stage 2: --resume skips the finished stage 1 and continues stage 2 from its checkpoint."""
    common = ["--recipe=base", "--micro_batch_size=2", "--pretrain.global_batch_size=4",
              "--finetune.global_batch_size=4", "--max_steps=4", "--save_every=2"]
    _, full = train.main(run_args(tiny_llms, tiny_towers, dataset, tmp_path / "full", *common))
    real_save = train.save_checkpoint

    def crash_in_finetune(accelerator, work_dir, step, cfg, *args):
        real_save(accelerator, work_dir, step, cfg, *args)
        if cfg["stage"] == "finetune":
            raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(train, "save_checkpoint", crash_in_finetune)
    AcceleratorState._reset_state(True)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(tiny_llms, tiny_towers, dataset, tmp_path / "cut", *common))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    AcceleratorState._reset_state(True)
    _, resumed = train.main(run_args(tiny_llms, tiny_towers, dataset, tmp_path / "cut", *common, "--resume"))
    assert "pretrain" not in resumed                              # finished stage skipped
    assert resumed["finetune"] == pytest.approx(full["finetune"][2:], rel=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("group", [True, False])
def test_grouped_batches_cover_every_sample_and_align_modalities(world, group):
    import random
    rng = random.Random(world)
    lengths = [rng.choice([1, -1]) * rng.randint(1, 60) for _ in range(53)]
    batches = train.grouped_batches(lengths, 4, seed=7, group_by_length=group, world=world)
    assert len(batches) % world == 0 and all(batches)
    flat = [i for b in batches for i in b]
    assert set(flat) == set(range(53)) and len(flat) - 53 < world * 2     # each once, a few top-ups at most
    assert batches == train.grouped_batches(lengths, 4, seed=7, group_by_length=group, world=world)
    if group:   # rank r gets batch i*world + r: one global micro-batch never mixes images and text-only
        for j in range(0, len(batches), world):
            assert len({lengths[i] > 0 for b in batches[j:j + world] for i in b}) == 1
        pad = lambda bs: sum(max(abs(lengths[i]) for i in b) * len(b) - sum(abs(lengths[i]) for i in b) for b in bs)
        shuffled = train.grouped_batches(lengths, 4, seed=7, group_by_length=False, world=world)
        assert pad(batches) < pad(shuffled)                                   # length grouping cuts padding


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("group", [True, False])
def test_batch_order_is_a_function_of_the_seed_alone(world, group):
    """grouped_batches draws from its own generator seeded with `seed`: the same seed gives the same order whatever
    the global RNG holds (dropout's, which a resume restores), and each other seed another order (train.py passes
    seed + epoch, so every epoch has its own). A generator left unseeded gives one fixed order for every seed."""
    import random
    rng = random.Random(3)
    lengths = [rng.choice([1, -1]) * rng.randint(1, 60) for _ in range(53)]
    orders = []
    for seed in (0, 1, 2, 42, 43):
        torch.manual_seed(1000 + seed)
        order = train.grouped_batches(lengths, 4, seed, group_by_length=group, world=world)
        torch.manual_seed(7)
        torch.rand(5)
        assert train.grouped_batches(lengths, 4, seed, group_by_length=group, world=world) == order
        orders.append([i for b in order for i in b])
    assert len({tuple(o) for o in orders}) == len(orders)                       # every seed its own order
    assert all(sum(a != b for a, b in zip(o, orders[0])) > 26 for o in orders[1:])   # not a small perturbation


def test_each_epoch_is_served_in_the_order_of_seed_plus_epoch(tiny_llms, tiny_towers, dataset, tmp_path, monkeypatch):
    """The loop's data order over two epochs: epoch e is exactly grouped_batches(..., seed + e), every sample once
    per epoch, and the two epochs differ (an epoch that repeats the last one's order trains on the same sequence of
    batches again)."""
    import data
    calls, served, real_batches, real_collate = {}, [], train.grouped_batches, data.collate

    def grouped_batches(lengths, batch_size, seed, *args, **kwargs):
        calls[seed] = real_batches(lengths, batch_size, seed, *args, **kwargs)
        return calls[seed]

    def collate(batch, *args, **kwargs):
        served.append([s["id"] for s in batch])
        return real_collate(batch, *args, **kwargs)
    monkeypatch.setattr(train, "grouped_batches", grouped_batches)
    monkeypatch.setattr(data, "collate", collate)
    # 16 image and 4 text-only samples: 5 steps of 2 micro-batches of 2 per epoch, 2 epochs
    finetune(tiny_llms, tiny_towers, dataset, tmp_path / "run", "--global_batch_size=4", "--micro_batch_size=2",
             "--epochs=2", "--seed=5", "--gradient_checkpointing=false", "--log_every=100")
    with open(dataset[0]) as f:
        ids = [r["id"] for r in json.load(f)]
    assert sorted(calls) == [5, 6]
    expected = [[[ids[i] for i in b] for b in calls[seed]] for seed in (5, 6)]
    assert served[:10] == expected[0] and served[10:] == expected[1]
    epochs = [[i for b in served[k:k + 10] for i in b] for k in (0, 10)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(ids) and epochs[0] != epochs[1]


def test_the_seed_sets_the_initial_weights(tiny_llms, tiny_towers, dataset, tmp_path, monkeypatch):
    """--seed seeds the stage (train_stage's torch.manual_seed): a connector built from parts starts from the same
    weights under the same seed, whatever ran before in the process, and from other ones under another seed."""
    import recipes
    starts, real = [], recipes.apply_recipe

    def apply_recipe(model, cfg, *args, **kwargs):
        out = real(model, cfg, *args, **kwargs)
        starts.append({k: v.detach().clone() for k, v in model.connector.state_dict().items()})
        return out
    monkeypatch.setattr(recipes, "apply_recipe", apply_recipe)
    for i, seed in enumerate((1, 1, 2)):
        torch.rand(i + 1)   # the global RNG in another state before each run
        finetune(tiny_llms, tiny_towers, dataset, tmp_path / str(i), "--global_batch_size=4", "--micro_batch_size=4",
                 "--max_steps=1", f"--seed={seed}", "--gradient_checkpointing=false")
    same, other = starts[:2], starts[2]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    assert not any(torch.equal(same[0][k], other[k]) for k in other if k.endswith("weight"))


def test_clipping_scales_the_step_to_grad_clip_and_the_log_shows_the_norm_before(tiny_llms, tiny_towers, dataset,
                                                                                 tmp_path, capsys):
    """grad_clip caps the global gradient norm the optimizer is handed (AdamW's first step is ~lr * sign(g) whatever
    the scale, so the weights after it cannot show whether clipping ran): the gradients of a clipped step are the
    unclipped ones times grad_clip / norm; the log's "grad X" is the norm before clipping; grad_clip=0 is off."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    runs = {}
    for clip in (0, 0.05, 1e6):
        seen = []
        hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(
            [p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
        capsys.readouterr()
        try:
            finetune(tiny_llms, tiny_towers, dataset, tmp_path / str(clip), "--global_batch_size=4",
                     "--micro_batch_size=4", "--max_steps=1", "--group_by_length=false", f"--grad_clip={clip}",
                     "--gradient_checkpointing=false", "--log_every=1")
        finally:
            hook.remove()
        logged = [line.split("| grad ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines()
                  if "| grad " in line]
        assert len(seen) == len(logged) == 1
        runs[clip] = seen[0], logged[0]
    (grads, logged), norm = runs[0], lambda gs: float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gs])))
    total = norm(grads)
    assert total > 0.5 and logged == f"{total:.3f}"                       # unclipped: the norm as logged
    clipped, logged_clipped = runs[0.05]
    assert logged_clipped == logged and norm(clipped) == pytest.approx(0.05, rel=1e-4)
    for a, b in zip(clipped, grads):
        torch.testing.assert_close(a, b * (0.05 / total), rtol=1e-4, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(runs[1e6][0], grads))    # a clip above the norm changes nothing


def test_training_mode_dropout_and_checkpointing_are_live(tiny_llms, tiny_towers, dataset, tmp_path, monkeypatch):
    """from_pretrained returns the LLM in eval mode: the loop must switch it to train mode, or dropout is off and
    HF's gradient checkpointing (gated on .training) silently never recomputes. With checkpointing each decoder
    layer runs twice per micro-batch (forward, then again in backward)."""
    from transformers.models.llama.modeling_llama import LlamaMLP   # inside the checkpointed decoder layer
    calls, forward = [], LlamaMLP.forward

    def spy(self, *args, **kwargs):
        calls.append(self.training)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(LlamaMLP, "forward", spy)
    for ckpt, runs in [("false", 1), ("true", 2)]:
        calls.clear()
        finetune(tiny_llms, tiny_towers, dataset, tmp_path / ckpt, "--global_batch_size=2", "--micro_batch_size=2",
                 "--max_steps=1", f"--gradient_checkpointing={ckpt}")
        layers = len(calls) // runs
        assert calls and all(calls) and layers * runs == len(calls) and layers == 2, (ckpt, calls)


def test_auto_checkpointing_is_decided_from_a_measured_step(tiny_llms, tiny_towers, dataset, tmp_path, monkeypatch,
                                                             capsys):
    """--gradient_checkpointing=auto (the default) runs one forward and backward of the longest micro-batch without
    it and measures its memory: with room it stays off (the trial's forward, then each layer once per micro-batch),
    with no room it goes on (each layer twice); the losses equal those of an explicit false either way."""
    import flops
    from transformers.models.llama.modeling_llama import LlamaMLP   # one call per decoder layer and pass
    calls, forward = [], LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    losses = {}
    for name, ckpt, free, layer_calls in [("false", "false", None, 2 * 2), ("room", "auto", None, 2 + 2 * 2),
                                          ("no room", "auto", 0.0, 2 + 2 * 2 * 2)]:
        if free is not None:
            monkeypatch.setattr(flops, "free_mib", lambda device: free)
        calls.clear()
        _, res = finetune(tiny_llms, tiny_towers, dataset, tmp_path / name.replace(" ", "_"), "--max_steps=2",
                          "--global_batch_size=2", "--micro_batch_size=2", f"--gradient_checkpointing={ckpt}")
        out = capsys.readouterr().out
        assert len(calls) == layer_calls, (name, len(calls))
        if ckpt == "auto":
            line = next(x for x in out.splitlines() if x.startswith("gradient checkpointing"))
            assert line.startswith(f"gradient checkpointing {'on' if free == 0 else 'off'} (auto: a step of the 2 "
                                   "longest samples without it: "), line
            assert float(line.split("without it: ")[1].split(" MiB")[0]) > 0
        losses[name] = res["finetune"]
    assert losses["room"] == losses["false"]
    torch.testing.assert_close(torch.tensor(losses["no room"]), torch.tensor(losses["false"]), rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="expected true/false/auto, got 'sometimes'"):
        finetune(tiny_llms, tiny_towers, dataset, tmp_path / "bad", "--gradient_checkpointing=sometimes")


def test_validation_loss_and_gradient_checkpointing(tiny_llms, tiny_towers, dataset, tmp_path, capsys):
    data, images = dataset
    _, res = finetune(tiny_llms, tiny_towers, dataset, tmp_path / "v", "--global_batch_size=4", "--micro_batch_size=2",
                      "--max_steps=2", f"--data_val={data}", f"--images_val={images}", "--val_every=1",
                      "--val_batches=2", "--gradient_checkpointing=true")
    out = capsys.readouterr().out
    vals = [float(line.split("val loss ")[1]) for line in out.splitlines() if "val loss" in line]
    assert len(vals) == 2 and all(v > 0 for v in vals)
    with open(tmp_path / "v" / "tinyllava_run.json") as f:
        assert json.load(f)["config"]["gradient_checkpointing"] is True   # the resolved config is saved


def test_watching_training_bar_tags_loss_png_and_cached_machine_numbers(tiny_llms, tiny_towers, dataset, tmp_path,
                                                                         monkeypatch, capsys):
    """A progress bar on a terminal; tracker tags per stage over one step count; losses.json and loss.png per stage;
    the thread count and MFU peak measured once per machine (cached), without touching the RNG the run uses."""
    import sys

    from accelerate import Accelerator
    from PIL import Image
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **k: logged.append((step, values)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    measures = []
    import flops
    real_threads = flops.fastest_threads
    monkeypatch.setattr(flops, "fastest_threads", lambda *a: measures.append(a) or real_threads(*a))
    common = ["--recipe=base", "--micro_batch_size=2", "--pretrain.global_batch_size=4",
              "--finetune.global_batch_size=4", "--max_steps=3", "--peak_flops=0"]
    _, cold = train.main(run_args(tiny_llms, tiny_towers, dataset, tmp_path / "a", *common))
    err = capsys.readouterr().err
    assert "pretrain: 100%" in err and "finetune: 100%" in err and "samples/s" in err and "loss" in err
    names = ["elapsed_s", "epoch", "flops", "grad_norm", "loss", "lr", "mfu_percent", "samples", "samples_per_s",
             "tokens", "tokens_per_s"]   # every number of metrics.jsonl's rows but the step (tests/test_run_log.py)
    assert [(s, sorted(v)) for s, v in logged] == [(s, [f"{stage}/{n}" for n in names]) for s, stage in
                                                   [(1, "pretrain"), (2, "pretrain"), (3, "pretrain"), (4, "finetune"),
                                                    (5, "finetune"), (6, "finetune")]]
    for stage in ("1_pretrain", "2_finetune"):
        assert len(json.load(open(tmp_path / "a" / stage / "losses.json"))) == 3
        assert Image.open(tmp_path / "a" / stage / "loss.png").size == (640, 360)
    cache = json.load(open(tmp_path / "cache" / "tinyllava-nano" / "machine.json"))
    assert len(measures) == 1 and any(k.startswith("threads|") for k in cache) and any(k.startswith("peak|") for k in cache)
    AcceleratorState._reset_state(True)
    _, warm = train.main(run_args(tiny_llms, tiny_towers, dataset, tmp_path / "b", *common))
    assert len(measures) == 1 and warm == cold          # cached; the measurement never moved the run's RNG
    AcceleratorState._reset_state(True)
    try:
        train.main(run_args(tiny_llms, tiny_towers, dataset, tmp_path / "c", *common, "--threads=1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(flops.CORES)

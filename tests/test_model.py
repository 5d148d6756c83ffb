"""The composed model on tiny random checkpoints: every LLM family, every tower, every connector."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, LLMS, PATCH, save_tiny_tower
from transformers import CLIPVisionModel, Dinov2Model, SiglipVisionModel

from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model import ModelArgs, build_model, load_pretrained, save_pretrained

GRID = (IMAGE_SIZE // PATCH) ** 2   # 16 patches per image


def make(tiny_llms, tiny_towers, family="llama", tower="siglip", **kw):
    args = ModelArgs(llm=tiny_llms[family], vision_tower=tiny_towers[tower], **kw)
    return build_model(args)


def batch(model, tokenizer, rows, seed=0, padding_side="right"):
    """rows: list of (n_text_before, has_image, n_text_after). Random text ids, the image sentinel run
    in the middle, labels on the text among the last 3 tokens. Returns the padded batch and the per-row pieces."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.language_model.get_input_embeddings().num_embeddings
    n_img = model.num_image_tokens
    seqs, labs, imgs = [], [], []
    for before, has_image, after in rows:
        ids = torch.randint(5, vocab, (before,), generator=g).tolist()
        if has_image:
            ids += [IMAGE_TOKEN_INDEX] * n_img
            imgs.append(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g))
        ids += torch.randint(5, vocab, (after,), generator=g).tolist()
        lab = [t if k >= len(ids) - 3 and t >= 0 else IGNORE_INDEX for k, t in enumerate(ids)]
        seqs.append(torch.tensor(ids))
        labs.append(torch.tensor(lab))
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    labels = torch.full((len(rows), L), IGNORE_INDEX)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        sl = slice(L - len(s), L) if padding_side == "left" else slice(0, len(s))
        input_ids[i, sl], labels[i, sl], mask[i, sl] = s, lab, 1
    images = torch.stack(imgs) if imgs else None
    return input_ids, mask, labels, images, (seqs, labs, imgs)


def reference_loss(model, seqs, labs, imgs):
    """One row at a time, the LLaVA way: concatenate text embeddings and image features by hand and let the
    HF model compute its own shifted cross-entropy over the whole vocabulary."""
    emb = model.language_model.get_input_embeddings()
    total, count, k = 0.0, 0, 0
    for ids, lab in zip(seqs, labs):
        is_img = ids == IMAGE_TOKEN_INDEX
        if is_img.any():
            feats = model.connector(model.vision_tower(imgs[k][None]))[0]
            k += 1
            start = int(is_img.nonzero()[0])
            e = torch.cat([emb(ids[:start][None])[0], feats, emb(ids[start + len(feats):][None])[0]])
        else:
            e = emb(ids[None])[0]
        out = model.language_model(inputs_embeds=e[None], labels=lab[None])
        n = int((lab[1:] != IGNORE_INDEX).sum())
        total, count = total + out.loss * n, count + n
    return total / count


@pytest.mark.parametrize("family", list(LLMS))
def test_every_llm_family_forward_backward(tiny_llms, tiny_towers, family):
    model, tok, _ = make(tiny_llms, tiny_towers, family, "siglip")
    input_ids, mask, labels, images, pieces = batch(model, tok, [(4, True, 6), (9, False, 3), (2, True, 2)])
    out = model(input_ids, mask, labels=labels, images=images)
    assert out["num_tokens"] == 3 + 3 + 2          # the last row's 3rd-to-last token is the image
    torch.testing.assert_close(out["loss"], reference_loss(model, *pieces), rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    for name, p in list(model.connector.named_parameters()) + list(model.language_model.named_parameters())[:3]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", list(LLMS))
def test_supervised_only_loss_equals_full_logits_loss(tiny_llms, tiny_towers, family, monkeypatch):
    """The LM head only at the supervised positions, there 3 rows at a time with each chunk's gradients formed in
    the forward (LinearCrossEntropy, the default): the same loss and the same gradients as full logits. Phi's head
    has a bias, Gemma's is tied to the embeddings."""
    import model as M
    model, tok, _ = make(tiny_llms, tiny_towers, family, "clip")
    monkeypatch.setattr(M, "LOSS_CHUNK", 3 * model.language_model.get_output_embeddings().out_features)
    chunks, forward = [], M.LinearCrossEntropy.forward
    monkeypatch.setattr(M.LinearCrossEntropy, "forward", staticmethod(
        lambda ctx, hidden, *a: chunks.append(len(hidden)) or forward(ctx, hidden, *a)))
    input_ids, mask, labels, images, _ = batch(model, tok, [(3, True, 5), (7, False, 4)], seed=1)
    runs = []
    for supervised_only, chunked in [(True, True), (True, False), (False, False)]:
        model.zero_grad(set_to_none=True)
        model.supervised_only_loss, model.chunked_loss = supervised_only, chunked
        out = model(input_ids, mask, labels=labels, images=images)
        (2.5 * out["loss_sum"]).backward()
        runs.append((out["loss_sum"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert chunks == [int(out["num_tokens"])] and chunks[0] > 3   # one call, more than one chunk of 3 rows
    (full_loss, full_grads) = runs[2]
    for loss, grads in runs[:2]:
        torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == full_grads.keys()
        for name, g in grads.items():   # float noise through the LLM: ~2e-6 of a tensor's max, more on some runs;
            # a lost bias gradient or backward scale is of the order of the max (the +1e-7: grads that are 0)
            ref = full_grads[name]
            assert (g - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-7, name


@pytest.mark.parametrize("tower", ["clip", "siglip", "dinov2"])
def test_every_tower_tokens_and_features(tiny_llms, tiny_towers, tower):
    model, _, proc = make(tiny_llms, tiny_towers, "llama", tower)
    assert model.num_image_tokens == GRID        # CLIP/DINOv2 drop their CLS token, SigLIP has none
    hf = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "dinov2": Dinov2Model}[tower].from_pretrained(
        tiny_towers[tower])
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = hf(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    expected = expected if tower == "siglip" else expected[:, 1:]
    torch.testing.assert_close(model.vision_tower(x), expected)
    # layers after the feature layer, the final norm and the pooling head are gone, not just unused
    t = model.vision_tower.towers[0]
    layers = t.encoder.layers if hasattr(t.encoder, "layers") else t.encoder.layer
    assert len(layers) == hf.config.num_hidden_layers - 1
    names = [n for n, _ in t.named_parameters()]
    assert not any(n.startswith(("post_layernorm", "layernorm", "head")) for n in names), names


def test_feature_layer_and_strategies(tiny_llms, tiny_towers):
    hf = SiglipVisionModel.from_pretrained(tiny_towers["siglip"])
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    hs = hf(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in (0, 1, -1, -3):
        model, _, _ = make(tiny_llms, tiny_towers, "llama", "siglip", vision_feature_layer=layer)
        torch.testing.assert_close(model.vision_tower(x), hs[layer])
    # the original's SigLIP quirk, kept for its released weights: 'patch' drops a real patch (729 -> 728)
    legacy, _, _ = make(tiny_llms, tiny_towers, "llama", "siglip", legacy_patch_drop=True)
    assert legacy.num_image_tokens == GRID - 1
    torch.testing.assert_close(legacy.vision_tower(x), hs[-2][:, 1:])
    clip_all, _, _ = make(tiny_llms, tiny_towers, "llama", "clip", vision_feature_select_strategy="cls_patch")
    assert clip_all.num_image_tokens == GRID + 1
    with pytest.raises(ValueError, match="out of range"):
        make(tiny_llms, tiny_towers, "llama", "siglip", vision_feature_layer=-9)
    with pytest.raises(ValueError, match="cls_patch"):
        make(tiny_llms, tiny_towers, "llama", "siglip", vision_feature_select_strategy="cls")


def test_tower_kind_comes_from_config_not_path(tiny_llms, tiny_towers, tmp_path):
    misleading = str(tmp_path / "openai-clip-vit-large")        # a SigLIP checkpoint in a CLIP-looking dir
    shutil.copytree(tiny_towers["siglip"], misleading)
    model, _, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=misleading))
    assert isinstance(model.vision_tower.towers[0], SiglipVisionModel)
    with pytest.raises(ValueError, match="not supported; valid"):
        build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_llms["phi"]))


def test_mof_two_towers(tiny_llms, tiny_towers):
    model, tok, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["clip"],
                                          vision_tower2=tiny_towers["dinov2"], connector="mof_mlp"))
    assert model.num_image_tokens == 2 * GRID                    # CLIP and DINOv2 tokens interleaved
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    clip_feats, dino_feats = model.vision_tower(x)
    feats = model.connector((clip_feats, dino_feats))
    torch.testing.assert_close(feats[:, 0::2], model.connector._connector.clip(clip_feats))
    torch.testing.assert_close(feats[:, 1::2], model.connector._connector.dinov2(dino_feats))
    input_ids, mask, labels, images, _ = batch(model, tok, [(2, True, 4)])
    model(input_ids, mask, labels=labels, images=images)["loss"].backward()
    with pytest.raises(ValueError, match="MoF"):
        build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"],
                              vision_tower2=tiny_towers["dinov2"], connector="mof_mlp"))


@pytest.mark.parametrize("connector,tokens", [("identity", GRID), ("linear", GRID), ("mlp2x_gelu", GRID),
                                              ("mlp3x_gelu", GRID), ("qformer", 8), ("resampler", 8),
                                              ("pixel_shuffle2_mlp2x_gelu", GRID // 4)])
def test_every_connector_in_the_model(tiny_llms, tiny_towers, tmp_path, connector, tokens):
    towers = dict(tiny_towers)
    if connector == "identity":                                   # identity needs tower width == LLM width
        towers["siglip"] = save_tiny_tower("siglip", str(tmp_path / "wide"), hidden=64)
    model, tok, _ = make(tiny_llms, towers, "llama", "siglip", connector=connector, num_queries=8,
                         num_resampler_layers=2)
    assert model.num_image_tokens == tokens
    model.vision_tower.requires_grad_(True)
    input_ids, mask, labels, images, _ = batch(model, tok, [(3, True, 4), (5, False, 2)])
    model(input_ids, mask, labels=labels, images=images)["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("language_model"):
            continue
        assert p.grad is not None, f"{name} got no gradient"


def test_text_only_rows_never_run_the_tower(tiny_llms, tiny_towers):
    model, tok, _ = make(tiny_llms, tiny_towers)
    seen = []
    model.vision_tower.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    input_ids, mask, labels, images, _ = batch(model, tok, [(4, False, 4), (6, False, 2)])
    assert images is None
    model(input_ids, mask, labels=labels)
    assert seen == []
    input_ids, mask, labels, images, _ = batch(model, tok, [(4, False, 4), (3, True, 2), (6, False, 2)])
    model(input_ids, mask, labels=labels, images=images)
    assert seen == [1]                                            # one picture for one image row
    with pytest.raises(ValueError, match="num_image_tokens"):
        model(input_ids, mask, labels=labels, images=None)


def test_frozen_tower_runs_without_autograd(tiny_llms, tiny_towers):
    """A frozen tower keeps no activations for backward: even an input that requires grad leaves its output
    outside the graph (run with autograd, it would not)."""
    model, _, _ = make(tiny_llms, tiny_towers)
    model.vision_tower.requires_grad_(False)
    seen = []
    model.vision_tower.register_forward_hook(lambda m, inp, out: seen.append(out.requires_grad))
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True)
    feats = model.encode_images(x)
    assert seen == [False] and feats.requires_grad                # the connector still trains
    model.vision_tower.requires_grad_(True)
    model.encode_images(x)
    assert seen == [False, True]


def test_padding_does_not_change_per_row_losses(tiny_llms, tiny_towers):
    model, tok, _ = make(tiny_llms, tiny_towers, "qwen2", "clip")
    rows = [(2, True, 9), (12, False, 3), (1, True, 1)]
    input_ids, mask, labels, images, (seqs, labs, imgs) = batch(model, tok, rows, seed=3)
    together = model(input_ids, mask, labels=labels, images=images)["loss_sum"]
    alone, k = 0.0, 0
    for ids, lab in zip(seqs, labs):
        img = None
        if (ids == IMAGE_TOKEN_INDEX).any():
            img, k = imgs[k][None], k + 1
        alone = alone + model(ids[None], torch.ones_like(ids)[None], labels=lab[None], images=img)["loss_sum"]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(LLMS))
def test_batched_generate_equals_one_by_one(tiny_llms, tiny_towers, family):
    model, tok, _ = make(tiny_llms, tiny_towers, family, "siglip")
    model.eval()
    rows = [(3, True, 5), (9, False, 2), (1, True, 1), (4, False, 4)]
    input_ids, mask, _, images, (seqs, _, imgs) = batch(model, tok, rows, seed=4, padding_side="left")
    eos = tok.eos_token_id
    out = model.generate(input_ids, mask, images=images, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert out.shape[0] == len(rows) and out.shape[1] <= 6        # only new tokens come back
    k = 0
    for i, ids in enumerate(seqs):
        img = None
        if (ids == IMAGE_TOKEN_INDEX).any():
            img, k = imgs[k][None], k + 1
        one = model.generate(ids[None], torch.ones_like(ids)[None], images=img, max_new_tokens=6,
                             do_sample=False, eos_token_id=eos)[0]
        assert out[i, :len(one)].tolist() == one.tolist(), f"row {i}"
    with pytest.raises(ValueError, match="left-padded"):
        right = batch(model, tok, rows, seed=4)
        model.generate(right[0], right[1], images=right[3], max_new_tokens=2)


def test_save_load_roundtrip_offline(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["phi"], vision_tower=tiny_towers["clip"],
                                             vision_tower2=tiny_towers["dinov2"], connector="mof_mlp"))
    with torch.no_grad():
        for p in model.connector.parameters():
            p.add_(0.01)                                          # something a fresh build would not reproduce
    save_pretrained(model, tok, proc, str(tmp_path / "run"))
    # the save stands alone: move it and delete nothing-else it could lean on
    moved = shutil.move(str(tmp_path / "run"), str(tmp_path / "elsewhere"))
    assert sorted(os.listdir(moved))[:2] == ["config.json", "model.safetensors"]
    loaded, tok2, proc2 = load_pretrained(moved)
    input_ids, mask, labels, images, _ = batch(model, tok, [(3, True, 4), (5, False, 2)])
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input_ids, mask, images=images)["logits"],
                               model(input_ids, mask, images=images)["logits"], rtol=0, atol=0)
    assert tok2.pad_token_id == tok.pad_token_id and loaded.num_image_tokens == model.num_image_tokens
    assert not any(f.endswith(".tmp") for f in os.listdir(moved))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="tinyllava_nano"):
        load_pretrained(str(tmp_path))


def test_mixed_batch_loss_matches_manual_cross_entropy(tiny_llms, tiny_towers):
    """The loss is a plain CE over supervised positions only: check it against logits computed by hand."""
    model, tok, _ = make(tiny_llms, tiny_towers, "gemma", "dinov2")
    input_ids, mask, labels, images, _ = batch(model, tok, [(2, True, 6), (8, False, 3)], seed=5)
    logits = model(input_ids, mask, images=images)["logits"]
    t = labels[:, 1:]
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(model(input_ids, mask, labels=labels, images=images)["loss_sum"], manual,
                               rtol=1e-5, atol=1e-4)


def test_text_only_batch_keeps_trainable_parts_in_the_graph(tiny_llms, tiny_towers):
    """Connector-only stage (frozen LLM), a batch with no picture: backward works and the connector gets an
    exact zero gradient (the DDP all-reduce needs one from every rank), the tower never runs."""
    model, tok, _ = make(tiny_llms, tiny_towers)
    model.language_model.requires_grad_(False)
    model.vision_tower.requires_grad_(False)
    input_ids, mask, labels, images, _ = batch(model, tok, [(4, False, 4)])
    out = model(input_ids, mask, labels=labels)
    out["loss"].backward()
    for name, p in model.connector.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_saved_config_keeps_the_training_preprocessing(tiny_llms, tiny_towers, tmp_path):
    model, tok, proc = make(tiny_llms, tiny_towers, image_aspect_ratio="pad")
    save_pretrained(model, tok, proc, str(tmp_path / "m"))
    assert load_pretrained(str(tmp_path / "m"))[0].args.image_aspect_ratio == "pad"

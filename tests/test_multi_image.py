"""Several images in one conversation (issue 26): the record checks, a one-image list equal to today's string
(ids, labels, logits), each image's features at its own placeholder with counts varying within a batch, for every
connector, the feature cache per image and length grouping counting every image's tokens."""
import json
import os

import pytest
import torch
from conftest import IMAGE_SIZE, save_tiny_tower
from PIL import Image

import records as records_py
from data import IMAGE_TOKEN_INDEX, VLMDataset, check, collate, encode, render
from model import FeatureCache, ModelArgs, build_model

COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 30)]


def conv(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def images(root):
    os.makedirs(root, exist_ok=True)
    for i, c in enumerate(COLORS):
        Image.new("RGB", (24 + 8 * i, 20), c).save(os.path.join(root, f"{i}.png"))
    return str(root)


def codes(record, **kw):
    return [c for c, _ in records_py.record_problems(record, **kw)]


def test_the_checks_of_image_lists():
    assert codes({"image": ["0.png", "1.png"], "conversations": conv("<image> and <image>: same?", "No.")}) == []
    assert codes({"image": ["0.png", "1.png"], "conversations": conv("<image>\nWhat?", "A.", "And <image>?", "B.")}) == []
    assert codes({"image": ["0.png"], "conversations": conv("<image>\nWhat?", "A.")}) == []
    assert codes({"image": [], "conversations": conv("What?", "A.")}) == ["empty-image-list"]
    assert codes({"image": ["0.png", "1.png"], "conversations": conv("<image>\nWhat?", "A.")}) == ["image-count-mismatch"]
    assert codes({"image": "0.png", "conversations": conv("<image><image>", "A.")}) == ["image-count-mismatch"]
    assert codes({"conversations": conv("<image><image>", "A.")}) == ["placeholder-without-image"]
    assert codes({"image": ["0.png", "./0.png"], "conversations": conv("<image><image>", "A.")}) == ["repeated-image"]
    assert codes({"image": ["0.png", 3], "conversations": conv("<image><image>", "A.")}) == ["bad-image-field"]
    assert codes({"image": ["0.png", "../x.png"], "conversations": conv("<image><image>", "A.")}) == ["image-outside"]
    three = {"image": ["0.png", "1.png", "2.png"], "conversations": conv("<image><image><image>", "A.")}
    assert codes(three, max_images=2) == ["too-many-images"] and codes(three, max_images=None) == []


def test_the_max_images_setting(tmp_path):
    import recipes
    from stage_check import check_stages
    assert recipes.load_config(["--max_images=2"])["max_images"] == 2
    with pytest.raises(recipes.ConfigError, match="max_images"):
        recipes.load_config(["--max_images=0"])
    three = [{"id": "3", "image": ["0.png", "1.png", "2.png"], "conversations": conv("<image><image><image>", "A.")}]
    (tmp_path / "d.json").write_text(json.dumps(three))
    images(tmp_path / "images")
    stage = dict(recipes.load_config(["--max_images=2"]), stage="finetune", data="finetune",
                 data_finetune=str(tmp_path / "d.json"), images_finetune=str(tmp_path / "images"))
    with pytest.raises(Exception, match="too-many-images"):
        check_stages([stage], "nowhere")


def test_a_turn_with_several_images_keeps_them_in_place_and_one_is_relocated_as_ever():
    text, _ = render(conv("First <image> then <image> same?", "No.", "Now <image>?", "Yes."), "phi")
    assert "USER: First <image> then <image> same? ASSISTANT:" in text
    assert "USER: <image>\nNow ? ASSISTANT:" in text   # one image in a turn: the original's relocation


@pytest.fixture(scope="module")
def siglip_model(tiny_llms, tiny_towers):
    return build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))


def dataset(records, tok, proc, folder, n_img, **kw):
    return VLMDataset(records, tok, proc, "llama", n_img, 512, folder, **kw)


def test_a_one_image_list_is_exactly_a_string(siglip_model, tmp_path):
    model, tok, proc = siglip_model
    folder = images(tmp_path / "images")
    c = conv("<image>\nWhat colour?", "Red.", "Sure?", "Yes.")
    one = [{"id": "a", "image": "0.png", "conversations": c}, {"id": "t", "conversations": conv("Hi?", "Hello.")},
           {"id": "b", "image": "2.png", "conversations": c}]
    listed = [dict(r, image=[r["image"]]) if "image" in r else r for r in one]
    a, b = (collate([dataset(rs, tok, proc, folder, model.num_image_tokens)[i] for i in range(3)], tok.pad_token_id)
            for rs in (one, listed))
    for k in ("input_ids", "labels", "attention_mask", "images"):
        assert torch.equal(a[k], b[k]), k
    assert a["n_images"] == b["n_images"] == 2
    with torch.no_grad():
        assert torch.equal(model(a["input_ids"], a["attention_mask"], images=a["images"])["logits"],
                           model(b["input_ids"], b["attention_mask"], images=b["images"])["logits"])


def blocks(ids, n):
    """Start positions of the image-token runs of one row."""
    at = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    return at[::n]


def check_positions(model, tok, rows, pixels):
    """rows: per sample, a list of pieces (int = that many text tokens, "img" = an image); pixels in reading order.
    Each image's features land at its own run; each row's logits equal that row alone with its own images."""
    g = torch.Generator().manual_seed(0)
    n, vocab = model.num_image_tokens, model.language_model.get_input_embeddings().num_embeddings
    seqs = []
    for pieces in rows:
        ids = []
        for p in pieces:
            ids += [IMAGE_TOKEN_INDEX] * n if p == "img" else torch.randint(5, vocab, (p,), generator=g).tolist()
        seqs.append(torch.tensor(ids))
    b = collate([{"input_ids": s, "labels": s, "pixel_values": None} for s in seqs], tok.pad_token_id)
    with torch.no_grad():
        embeds = model.embed(b["input_ids"], images=pixels)
        alone = model.encode_images(pixels)
        k = 0
        for row, pieces in enumerate(rows):
            for start in blocks(b["input_ids"][row], n):
                torch.testing.assert_close(embeds[row, start:start + n], model.encode_images(pixels[k:k + 1])[0])
                torch.testing.assert_close(embeds[row, start:start + n], alone[k])
                k += 1
        assert k == len(pixels)
        logits = model(b["input_ids"], b["attention_mask"], images=pixels)["logits"]
        k = 0
        for row, s in enumerate(seqs):
            m = pieces_images = int((s == IMAGE_TOKEN_INDEX).sum()) // n
            own = model(s[None], images=pixels[k:k + m] if m else None)["logits"][0]
            torch.testing.assert_close(logits[row, :len(s)], own, atol=1e-4, rtol=1e-4)
            k += pieces_images


MIXED = [[3, "img", 2, "img", 4], [6], ["img", 5], [2, "img", 1, "img", 1, "img", 2]]   # 2, 0, 1, 3 images


@pytest.mark.parametrize("connector", ["identity", "linear", "mlp2x_gelu", "qformer", "resampler",
                                       "pixel_shuffle2_mlp2x_gelu", "mof_mlp"])
def test_each_image_lands_at_its_placeholder_for_every_connector(tiny_llms, tiny_towers, tmp_path, connector):
    towers, tower2 = dict(tiny_towers), ""
    if connector == "identity":   # tower width == LLM width
        towers["siglip"] = save_tiny_tower("siglip", str(tmp_path / "wide"), hidden=64)
    if connector == "mof_mlp":
        towers["siglip"], tower2 = tiny_towers["clip"], tiny_towers["dinov2"]
    model, tok, _ = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=towers["siglip"], vision_tower2=tower2,
                                          connector=connector, num_queries=4, num_resampler_layers=1))
    model.eval()
    pixels = torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    check_positions(model, tok, MIXED, pixels)


def test_the_dataset_stacks_a_records_images_in_order_and_truncation_keeps_whole_leading_ones(siglip_model, tmp_path):
    model, tok, proc = siglip_model
    folder, n = images(tmp_path / "images"), model.num_image_tokens
    recs = [{"id": "two", "image": ["2.png", "0.png"], "conversations": conv("<image> or <image>?", "Left.")},
            {"id": "later", "image": ["1.png", "3.png"], "conversations": conv("<image>\nThis?", "A.", "<image>\nAnd?", "B.")},
            {"id": "one", "image": "1.png", "conversations": conv("<image>\nThis?", "A.")}]
    ds = dataset(recs, tok, proc, folder, n)
    assert ds.lengths[0] > 2 * n and ds.lengths[2] > n and ds.lengths[0] - ds.lengths[2] >= n   # every image counts
    single = dataset([{"id": i, "image": f"{i}.png", "conversations": conv("<image>\nA?", "B.")} for i in range(4)],
                     tok, proc, folder, n)
    px = {i: single[i]["pixel_values"] for i in range(4)}
    b = collate([ds[0], ds[1], ds[2]], tok.pad_token_id)
    assert b["n_images"] == 5 and torch.equal(b["images"], torch.stack([px[2], px[0], px[1], px[3], px[1]]))
    assert [len(blocks(r, n)) for r in b["input_ids"]] == [2, 2, 1]
    ids = encode(recs[1]["conversations"], "llama", tok, n)["input_ids"]
    first = blocks(ids, n)[1]   # cut inside the second image: that image and what follows go, the first stays
    kept = dataset(recs[1:2], tok, proc, folder, n)
    kept.max_length = first + 3
    s = kept[0]
    assert s["pixel_values"].shape[0] == 1 and int((s["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == n
    assert torch.equal(s["pixel_values"][0], px[1]) and len(s["input_ids"]) == first


def test_the_feature_cache_holds_each_image_of_a_list(siglip_model, tmp_path):
    model, tok, proc = siglip_model
    folder, n = images(tmp_path / "images"), model.num_image_tokens
    recs = [{"id": "two", "image": ["2.png", "0.png"], "conversations": conv("<image> or <image>?", "Left.")},
            {"id": "one", "image": "1.png", "conversations": conv("<image>\nThis?", "A.")}]
    cache = FeatureCache(str(tmp_path / "cache"), model, proc)
    assert cache.fill(model, [x for r in recs for x in records_py.record_images(r)], folder) == (3, 0)
    plain = collate([dataset(recs, tok, proc, folder, n)[i] for i in range(2)], tok.pad_token_id)
    cached = collate([dataset(recs, tok, proc, folder, n, feature_cache=cache)[i] for i in range(2)], tok.pad_token_id)
    assert cached["images"] is None and cached["n_images"] == 3 and cached["tower_features"].shape[0] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(plain["input_ids"], plain["attention_mask"], images=plain["images"])["logits"],
                                   model(cached["input_ids"], cached["attention_mask"],
                                         tower_features=cached["tower_features"])["logits"])


def test_the_data_check_reports_the_image_token_budget(siglip_model, tmp_path):
    model, tok, proc = siglip_model
    folder, n = images(tmp_path / "images"), model.num_image_tokens
    recs = [{"id": "big", "image": ["0.png", "1.png", "2.png"], "conversations": conv("<image><image><image>?", "A.")},
            {"id": "fits", "image": ["0.png", "1.png"], "conversations": conv("<image> <image>?", "A.")}]
    found = check(recs, folder, tok, "pretrain", n, max_length=3 * n)
    assert [(i, code) for i, _, code, _ in found["problems"]] == [(0, "images-over-max-length")]
    found = check(recs, folder, tok, "pretrain", n, max_length=3 * n, max_images=2)
    assert [(i, code) for i, _, code, _ in found["problems"]] == [(0, "too-many-images")]


# ---------------------------------------------------------------------------- evaluation
def mmmu_question(qid, **images):
    return {"id": qid, "prompt": "Is <image 2> the same as <image 1>?\n(A) yes\n(B) no\nAnswer with the option's "
            "letter from the given choices directly.", "question_type": "multiple-choice", "all_choices": ["A", "B"],
            "index2ans": {"A": "yes", "B": "no"}, **images}


def test_mmmu_questions_with_several_images_are_asked_in_place_or_guessed_by_option(tmp_path):
    import answers
    path = tmp_path / "anns_for_eval.json"
    path.write_text(json.dumps([mmmu_question("validation_Art_1", image_1="a.png", image_2="b.png"),
                                mmmu_question("validation_Art_2", image="c.png"), mmmu_question("validation_Art_3")]))
    several, one, unnamed = answers.load_questions("mmmu", str(path))
    assert several["image"] == ["b.png", "a.png"] and "answer" not in several   # in order of mention
    assert several["text"].startswith("Is <image 2> <image> the same as <image 1> <image>?")
    assert several["prompt"] == mmmu_question("x")["prompt"]                      # the answer row's key, as ever
    assert one["image"] == "c.png" and one["text"] == one["prompt"]
    assert unnamed["image"] is None and unnamed["answer"] in ("A", "B")           # no files named: the guess
    guessed = answers.load_questions("mmmu", str(path), "guess")[0]
    assert guessed["image"] is None and guessed["answer"] == answers.mmmu_multi_image_answer(mmmu_question(
        "validation_Art_1"))


@pytest.fixture(scope="module")
def eval_setup(tiny_llms, tiny_towers, tmp_path_factory):
    """A saved model with some weight on the image, a custom set and an MMMU set, each with two-image questions."""
    from model import save_pretrained
    root = tmp_path_factory.mktemp("eval_multi")
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    torch.manual_seed(0)
    for p in model.connector.parameters():
        p.data.normal_(0, 0.3)
    save_pretrained(model, tok, proc, str(root / "model"), template="llama")
    (root / "model" / "train_config.json").write_text(json.dumps({"template": "llama"}))
    folder = images(root / "custom" / "images")
    qs = [{"question_id": "two", "image": ["0.png", "1.png"], "text": "Same colour?", "category": "pair"},
          {"question_id": "placed", "image": ["2.png", "3.png"], "text": "Is <image> brighter than <image>?",
           "category": "pair"},
          {"question_id": "one", "image": "1.png", "text": "Which colour?", "category": "one"},
          {"question_id": "text", "text": "Why?", "category": "text"}]
    (root / "custom" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (root / "custom" / "answers.jsonl").write_text("".join(json.dumps({"question_id": q["question_id"],
                                                                       "answers": ["yes"]}) + "\n" for q in qs))
    mmmu = root / "MMMU"
    images(mmmu / "all_images")
    (mmmu / "anns_for_eval.json").write_text(json.dumps([
        mmmu_question("validation_Art_1", image_1="0.png", image_2="3.png"),
        mmmu_question("validation_Art_2", image="2.png")]))
    os.makedirs(mmmu / "eval")
    (mmmu / "eval" / "answer_dict_val.json").write_text(json.dumps({
        k: {"question_type": "multiple-choice", "ground_truth": "A"} for k in ("validation_Art_1", "validation_Art_2")}))
    return str(root / "model"), str(root), folder, (model.eval(), tok, proc)


def generated(parts, text, files, folder, max_new_tokens=5):
    """model.generate's greedy answer to one question holding its <image> placeholders, on its images in order."""
    from data import load_image, preprocess_image
    model, tok, proc = parts
    x = encode([{"from": "human", "value": text}], "llama", tok, model.num_image_tokens, for_generation=True)
    pixels = torch.stack([preprocess_image(load_image(os.path.join(folder, f)), proc) for f in files])
    new = model.generate(x["input_ids"][None], torch.ones_like(x["input_ids"][None]), images=pixels,
                         max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(new[0], skip_special_tokens=True).strip()


def test_evaluate_answers_questions_with_several_images_batched_as_one_by_one(eval_setup, tmp_path):
    import evaluate
    model, data, folder, parts = eval_setup
    rows = {}
    for b in ("4", "1"):
        results = evaluate.main(["--model", model, "--data", data, "--bench", "custom,mmmu", "--out",
                                 str(tmp_path / b), "--max-new-tokens", "5", "--batch-size", b])
        rows[b] = {r["question_id"]: r["text"] for res in results
                   for r in evaluate.read_json(str(tmp_path / b / f"{res['name']}_answers.jsonl"))}
    assert rows["4"] == rows["1"]
    assert rows["4"]["two"] == generated(parts, "<image>\n<image>\nSame colour?", ["0.png", "1.png"], folder)
    assert rows["4"]["placed"] == generated(parts, "Is <image> brighter than <image>?", ["2.png", "3.png"], folder)
    mmmu_folder = os.path.join(data, "MMMU", "all_images")
    text = mmmu_question("x")["prompt"].replace("<image 2>", "<image 2> <image>").replace("<image 1>",
                                                                                         "<image 1> <image>")
    assert rows["4"]["validation_Art_1"] == generated(parts, text, ["3.png", "0.png"], mmmu_folder)
    evaluate.main(["--model", model, "--data", data, "--bench", "mmmu", "--out", str(tmp_path / "g"),
                   "--max-new-tokens", "5", "--mmmu-multi-image", "guess"])
    guess = {r["question_id"]: r["text"] for r in evaluate.read_json(str(tmp_path / "g" / "mmmu_answers.jsonl"))}
    import answers
    assert guess["validation_Art_1"] == answers.mmmu_multi_image_answer(mmmu_question("validation_Art_1"))
    assert guess["validation_Art_2"] == rows["4"]["validation_Art_2"]


# ---------------------------------------------------------------------------- stage folders, pipeline, to-llava
def test_a_stage_folder_pipeline_and_llava_export_answer_two_images_as_chat(eval_setup, tmp_path):
    """The folder's chat template puts each image where the conversation has it, as training does; its processor
    and model (the registered Auto classes), pipeline("image-text-to-text") and the to-llava export answer a
    two-image question, and one with an image added in a later turn, as chat.py does."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoModelForImageTextToText, pipeline
    import chat
    import convert
    from data import load_image
    model_dir, _, folder, (model, tok, proc) = eval_setup
    pics = [load_image(os.path.join(folder, f)) for f in ("0.png", "1.png", "3.png")]
    talk = chat.Chat(model, tok, proc, "llama", None, 6, images=pics[:2])
    first = talk.ask("Same colour?")
    talk.add_image(pics[2])
    second = talk.ask("And this one?")
    msgs = [{"role": "user", "content": [{"type": "image", "image": pics[0]}, {"type": "image", "image": pics[1]},
                                         {"type": "text", "text": "Same colour?"}]}]
    later = msgs + [{"role": "assistant", "content": [{"type": "text", "text": first}]},
                    {"role": "user", "content": [{"type": "image", "image": pics[2]},
                                                 {"type": "text", "text": "And this one?"}]}]
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")   # training's pixels
    hf = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    for conv, want in ((msgs, first), (later, second)):
        x = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        new = hf.generate(**x, max_new_tokens=6, do_sample=False)[0, x["input_ids"].shape[1]:]
        assert processor.decode(new, skip_special_tokens=True).strip() == want
    pipe = pipeline("image-text-to-text", model=model_dir, trust_remote_code=True)
    reply = pipe(text=msgs, max_new_tokens=6)[0]["generated_text"][-1]["content"]
    assert reply.strip() == first
    convert.main(["to-llava", model_dir, str(tmp_path / "llava")])
    from transformers import LlavaForConditionalGeneration
    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "llava")).eval()
    lproc = AutoProcessor.from_pretrained(str(tmp_path / "llava"))
    x = lproc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt")
    new = llava.generate(**x, max_new_tokens=6, do_sample=False)[0, x["input_ids"].shape[1]:]
    assert lproc.decode(new, skip_special_tokens=True).strip() == first

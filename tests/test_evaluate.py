"""evaluate.py end to end: a tiny random model answers a fixture of each of the 8 benchmarks, written in the
benchmark's native files and folder layout (LLaVA-1.5 eval.zip); batched answers equal one-by-one answers; the
results table and JSON are written; scores read from the native ground-truth files equal hand-derived values;
an interrupted run resumes; an MM-Vet judge is reached through an OpenAI-compatible URL (a local server)."""
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

import evaluate
from model import ModelArgs, build_model, save_pretrained

MME = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
       "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
SHORT = "\nAnswer the question using a single word or phrase."


def dump(path, obj, lines=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj))


def image(path, color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (24, 20), color).save(path)


def write_benchmarks(root):
    """One small fixture per benchmark under root/, in LLaVA's eval layout. Returns {bench: answers to pre-write}
    whose scores are derived by hand in test_scores_from_the_native_files."""
    answers = {}
    # VQAv2: test-dev questions, the full test2015 id list (upload file), val-style annotations (local score)
    qs = [{"question_id": i, "image": f"COCO_test2015_{i}.jpg", "text": t + SHORT, "category": "default"}
          for i, t in [(1, "How many dogs?"), (2, "Is it sunny?"), (3, "What animal?")]]
    dump(f"{root}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", qs, lines=True)
    dump(f"{root}/vqav2/llava_vqav2_mscoco_test2015.jsonl", qs + [dict(qs[0], question_id=4)], lines=True)
    ann = lambda qid, gts, qtype="what": {"question_id": qid, "question_type": qtype, "answer_type": "other",  # noqa
                                          "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(gts)]}
    dump(f"{root}/vqav2/v2_mscoco_val2014_annotations.json",
         {"annotations": [ann(1, ["2"] * 10), ann(2, ["yes"] * 3 + ["no"] * 7), ann(3, ["dog"] * 10)]})
    for q in qs:
        image(f"{root}/vqav2/test2015/{q['image']}")
    answers["vqav2"] = ["two", "Yes.", "cat"]
    # GQA: LLaVA question file + the official testdev_balanced_questions.json (one unbalanced question)
    qs = [{"question_id": q, "image": f"n{q}.jpg", "text": t + SHORT} for q, t in
          [("201", "Is the sky blue?"), ("202", "Who is it?"), ("203", "Unbalanced?")]]
    dump(f"{root}/gqa/llava_gqa_testdev_balanced.jsonl", qs, lines=True)
    dump(f"{root}/gqa/data/testdev_balanced_questions.json", {
        "201": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
        "202": {"answer": "the man", "isBalanced": True, "types": {"structural": "query"}},
        "203": {"answer": "no", "isBalanced": False, "types": {"structural": "verify"}}})
    for q in qs:
        image(f"{root}/gqa/data/images/{q['image']}")
    answers["gqa"] = ["Yes.", "man", "no"]
    # ScienceQA-IMG: LLaVA conversation records (one text-only), problems.json, pid_splits.json
    conv = lambda v: [{"from": "human", "value": v}, {"from": "gpt", "value": "A"}]  # noqa: E731
    dump(f"{root}/scienceqa/llava_test_CQM-A.json", [
        {"id": "11", "image": "11/image.png", "conversations": conv("<image>\nWhich is hot?\nOptions: (A) ice (B) sun")},
        {"id": "12", "image": "12/image.png", "conversations": conv("<image>\nWhich is red?\nOptions: (A) red (B) blue")},
        {"id": "13", "conversations": conv("Which is a noun?\nOptions: (A) dog (B) run")}])
    dump(f"{root}/scienceqa/problems.json", {"11": {"choices": ["ice", "sun"], "answer": 1},
                                             "12": {"choices": ["red", "blue"], "answer": 0},
                                             "13": {"choices": ["dog", "run"], "answer": 0}})
    dump(f"{root}/scienceqa/pid_splits.json", {"test": ["11", "12", "13"], "val": []})
    image(f"{root}/scienceqa/images/test/11/image.png")
    image(f"{root}/scienceqa/images/test/12/image.png")
    answers["scienceqa"] = ["B", "The answer is A.", "(A)"]
    # TextVQA: question_id is the TextVQA image id; the question is recovered from the saved prompt
    dump(f"{root}/textvqa/llava_textvqa_val_v051_ocr.jsonl", [{"question_id": "abc1", "image": "abc1.jpg", "text":
         "what does the sign say?\nReference OCR token: STOP, exit" + SHORT}], lines=True)
    dump(f"{root}/textvqa/TextVQA_0.5.1_val.json", {"data": [
        {"image_id": "abc1", "question": "What does the sign say?", "answers": ["stop"] * 2 + ["exit"] * 8}]})
    image(f"{root}/textvqa/train_images/abc1.jpg")
    answers["textvqa"] = ["Stop."]
    # POPE: 2 questions per split; labels are JSON lines named .json, paired by position
    qs = [{"question_id": i + 1, "image": f"COCO_val2014_{i}.jpg", "text": "Is there a dog in the image?" + SHORT,
           "category": split} for i, split in enumerate(["adversarial", "adversarial", "popular", "popular",
                                                         "random", "random"])]
    dump(f"{root}/pope/llava_pope_test.jsonl", qs, lines=True)
    for split, labels in [("adversarial", ["yes", "no"]), ("popular", ["yes", "yes"]), ("random", ["no", "no"])]:
        dump(f"{root}/pope/coco/coco_pope_{split}.json", [{"question_id": k, "label": lab}
                                                          for k, lab in enumerate(labels)], lines=True)
    for q in qs:
        image(f"{root}/pope/val2014/{q['image']}")
    answers["pope"] = ["Yes, it is", "No", "not sure", "yes", "NO", "nope"]
    # MME: 14 tasks x 1 image x 2 questions; 'artwork' uses the images/ + questions_answers_YN/ layout; 'count'
    # has a question without 'Please answer yes or no.' whose ground truth has the double space
    qs, answers["mme"] = [], []
    for task in MME:
        sub = "images/" if task == "artwork" else ""
        qa_dir = f"{root}/MME/MME_Benchmark_release_version/{task}/" + ("questions_answers_YN/" if sub else "")
        image(f"{root}/MME/MME_Benchmark_release_version/{task}/{sub}0001.png")
        q1, q2 = f"Is this {task}? Please answer yes or no.", f"Is this not {task}?"
        os.makedirs(qa_dir, exist_ok=True)
        with open(qa_dir + "0001.txt", "w") as f:
            f.write(f"{q1}\tYes\n{q2}  Please answer yes or no.\tNo\n")
        qs += [{"question_id": f"{task}/{sub}0001.png", "image": f"{task}/{sub}0001.png", "text": q + SHORT,
                "category": task} for q in (q1, q2)]
        answers["mme"] += ["yes\nbecause", "No"] if task != "count" else ["Yes", "yes"]
    dump(f"{root}/MME/llava_mme.jsonl", qs, lines=True)
    # MM-Vet: question ids are ints, the submission keys are v1_<id>
    dump(f"{root}/mm-vet/llava-mm-vet.jsonl", [{"question_id": i, "image": f"v1_{i}.png", "text": t} for i, t in
                                               [(0, "What is 2+2?"), (1, "Read the sign.")]], lines=True)
    dump(f"{root}/mm-vet/mm-vet.json", {"v1_0": {"question": "What is 2+2?", "answer": "4", "capability": ["math"]},
                                        "v1_1": {"question": "Read the sign.", "answer": "STOP<OR>stop",
                                                 "capability": ["ocr", "rec"]}})
    image(f"{root}/mm-vet/images/v1_0.png")
    image(f"{root}/mm-vet/images/v1_1.png")
    answers["mmvet"] = ["4", "stop"]
    # MMMU: anns_for_eval.json; the question without "image" has several images and is not run
    mc = lambda qid, img=True: dict({"id": qid, "prompt": "Which one?\n(A) cat\n(B) dog\nAnswer with the option's "  # noqa
                                     "letter from the given choices directly.", "question_type": "multiple-choice",
                                     "all_choices": ["A", "B"], "index2ans": {"A": "cat", "B": "dog"}},
                                    **({"image": f"{qid}_1.png"} if img else {}))
    dump(f"{root}/MMMU/anns_for_eval.json", [
        mc("validation_Art_1"), mc("validation_Art_2"), mc("validation_Math_1", img=False),
        {"id": "validation_Math_2", "prompt": "What is 7/2?", "image": "validation_Math_2_1.png",
         "question_type": "open", "all_choices": [], "index2ans": {}}])
    dump(f"{root}/MMMU/eval/answer_dict_val.json", {
        "validation_Art_1": {"question_type": "multiple-choice", "ground_truth": "B"},
        "validation_Art_2": {"question_type": "multiple-choice", "ground_truth": "B"},
        "validation_Math_1": {"question_type": "multiple-choice", "ground_truth": ["A", "B"]},
        "validation_Math_2": {"question_type": "open", "ground_truth": "3.5"}})
    for qid in ("validation_Art_1", "validation_Art_2", "validation_Math_2"):
        image(f"{root}/MMMU/all_images/{qid}_1.png")
    answers["mmmu"] = ["The answer is (B)", "(A)", None, "so the result is 3.50"]
    # custom: LLaVA questions with categories (one text-only), references: one, ten, and one given as "answer"
    dump(f"{root}/custom/questions.jsonl", [
        {"question_id": "c1", "image": "c1.png", "text": "What colour is it?", "category": "colour"},
        {"question_id": "c2", "image": "c2.png", "text": "How many dots?", "category": "count"},
        {"question_id": "c3", "text": "Say hello.", "category": "colour"}], lines=True)
    dump(f"{root}/custom/answers.jsonl", [{"question_id": "c1", "answers": ["Red"]},
                                          {"question_id": "c2", "answers": ["2"] * 3 + ["two"] + ["3"] * 6},
                                          {"question_id": "c3", "answer": "hello"}], lines=True)
    image(f"{root}/custom/images/c1.png")
    image(f"{root}/custom/images/c2.png", (10, 10, 10))
    answers["custom"] = ["red.", "Two", "hi"]
    return answers


@pytest.fixture(scope="module")
def setup(tiny_llms, tiny_towers, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model, tok, proc = build_model(ModelArgs(llm=tiny_llms["llama"], vision_tower=tiny_towers["siglip"]))
    save_pretrained(model, tok, proc, str(root / "model"))
    dump(str(root / "model" / "train_config.json"), {"template": "llama"})
    return str(root / "model"), str(root / "data"), write_benchmarks(str(root / "data"))


def run(model, data, out, *extra):
    return evaluate.main(["--model", model, "--data", data, "--out", out, "--max-new-tokens", "5", *extra])


def test_every_benchmark_batched_equals_one_by_one(setup, tmp_path, capsys):
    model, data, prewritten = setup
    benches = ",".join(evaluate.BENCHES)
    rows = run(model, data, str(tmp_path / "b4"), "--bench", benches, "--batch-size", "4")
    table = capsys.readouterr().out
    run(model, data, str(tmp_path / "b1"), "--bench", benches, "--batch-size", "1")
    assert [r["bench"] for r in rows] == list(evaluate.BENCHES)
    for r in rows:
        bench = r["bench"]
        assert r["count"] == len(prewritten[bench]) and r["model"] == model and r["template"] == "llama"
        assert r["split"] == evaluate.BENCHES[bench]["split"] and r["seconds"] >= 0
        assert bench in table and r["split"] in table
        assert r["name"] == (bench if bench != "custom" else name_of(data, bench))   # the official names hold
        saved = evaluate.read_json(str(tmp_path / "b4" / f"{r['name']}_results.json"))
        assert saved["count"] == r["count"] and saved["headline"] == r["headline"]
        b4 = evaluate.read_json(str(tmp_path / "b4" / f"{r['name']}_answers.jsonl"))
        b1 = evaluate.read_json(str(tmp_path / "b1" / f"{r['name']}_answers.jsonl"))
        assert [(x["question_id"], x["text"]) for x in b4] == [(x["question_id"], x["text"]) for x in b1]
        # generated grouped by prompt length, written in question order (POPE's and MME's scorers read it in order)
        spec = evaluate.BENCHES[bench]
        qfile = os.path.join(data, spec["dir"], spec["questions"])
        assert [x["question_id"] for x in b4] == [q["question_id"] for q in evaluate.load_questions(bench, qfile)]
        assert set(b4[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    generated = [x["text"] for r in rows if r["bench"] != "mmmu"
                 for x in evaluate.read_json(str(tmp_path / "b4" / f"{r['name']}_answers.jsonl"))]
    assert len(set(generated)) > 1, "a random model should not say the same thing to every question"
    # the saved prompts follow LLaVA's scripts: the question file's text, except ScienceQA's (<image> + suffix)
    sqa = evaluate.read_json(str(tmp_path / "b4" / "scienceqa_answers.jsonl"))
    assert sqa[0]["prompt"] == ("<image>\nWhich is hot?\nOptions: (A) ice (B) sun\nAnswer with the option's letter "
                                "from the given choices directly.")
    assert not sqa[2]["prompt"].startswith("<image>")
    tvqa = evaluate.read_json(str(tmp_path / "b4" / "textvqa_answers.jsonl"))
    assert tvqa[0]["prompt"] == evaluate.read_json(f"{data}/textvqa/llava_textvqa_val_v051_ocr.jsonl")[0]["text"]


def name_of(data, bench):
    """What evaluate.py names the files of this fixture's question file: the benchmark's official names, and
    custom-<folder>-<hash> for the custom set (answers.set_name)."""
    spec = evaluate.BENCHES[bench]
    qfile = f"{data}/{spec['dir']}/{spec['questions']}"
    return evaluate.set_name(bench, qfile, qfile)


def prewrite(out, bench, questions, texts, name=None):
    os.makedirs(out, exist_ok=True)
    dump(os.path.join(out, f"{name or bench}_answers.jsonl"), [
        {"question_id": q["question_id"], "prompt": q["prompt"], "text": t, "answer_id": "x", "model_id": "m",
         "metadata": {}} for q, t in zip(questions, texts) if t is not None], lines=True)


def test_scores_from_the_native_files(setup, tmp_path):
    """Answers pre-written (as by another tool: --keep-answers, nothing is generated), scored from each
    benchmark's native files."""
    model, data, prewritten = setup
    out = str(tmp_path)
    for bench, texts in prewritten.items():
        spec = evaluate.BENCHES[bench]
        prewrite(out, bench, evaluate.load_questions(bench, f"{data}/{spec['dir']}/{spec['questions']}"), texts,
                 name_of(data, bench))
    res = {r["bench"]: r for r in run(model, data, out, "--bench", ",".join(prewritten), "--keep-answers")}
    # VQAv2: "two" -> "2" (EvalAI processor) vs 10x "2": 100; "Yes." vs 3 yes: 0.9 (leave-one-out); "cat": 0
    assert res["vqav2"]["headline"]["accuracy"] == pytest.approx((100 + 90 + 0) / 3, abs=0.01)
    upload = evaluate.read_json(f"{out}/vqav2_upload.json")
    assert upload == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "yes"},
                      {"question_id": 3, "answer": "cat"}, {"question_id": 4, "answer": ""}]
    # GQA: "Yes." -> "yes" right, "man" != "the man"; the unbalanced question does not count
    assert res["gqa"]["headline"]["accuracy"] == 50.0
    assert evaluate.read_json(f"{out}/gqa_testdev_balanced_predictions.json")[0] == {"questionId": "201",
                                                                                   "prediction": "yes"}
    # ScienceQA: "B" right, "The answer is A." right, "(A)" fails to parse; img subset = the two image questions
    assert res["scienceqa"]["headline"] == {"img_acc": 100.0, "acc": pytest.approx(200 / 3)}
    # TextVQA: "Stop." -> "stop", 2 of 10 annotators: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert res["textvqa"]["headline"]["accuracy"] == pytest.approx(60.0)
    # POPE per split: adversarial TP+TN; popular "not sure" -> no (FN) + TP; random: "NO", "nope" -> yes (FP, FP)
    pope = res["pope"]["metrics"]["splits"]
    assert [pope[s]["accuracy"] for s in ("adversarial", "popular", "random")] == [1.0, 0.5, 0.0]
    assert pope["popular"]["f1"] == pytest.approx(2 / 3, abs=1e-5) and pope["random"]["yes_ratio"] == 1.0
    # the table's yes-ratio (POPE's parser: only no / not / No say no) and answers neither yes nor no ("not", "nope")
    assert (res["pope"]["headline"]["yes_ratio"], res["pope"]["headline"]["neither"]) == (4 / 6, 2)
    # MME: count has one wrong answer (acc 0.5, acc+ 0 -> 50), every other task 200; "yes\nbecause" -> yes (15 of 28)
    assert res["mme"]["headline"] == {"perception": 9 * 200 + 50, "cognition": 4 * 200, "yes_ratio": 15 / 28,
                                      "neither": 0}
    with open(f"{out}/mme_answers/count.txt") as f:
        assert f.read().split("\n")[1].split("\t") == ["0001.txt", "Is this not count?  Please answer yes or no.",
                                                        "No", "yes"]
    # MM-Vet without a judge: the submission file for the official grader
    assert res["mmvet"]["headline"]["total"] == "upload the submission (README)"
    assert evaluate.read_json(f"{out}/mmvet_submission.json") == {"v1_0": "4", "v1_1": "stop"}
    # MMMU: (B) right, (A) wrong, the multi-image question gets a preset guess (both letters are gold), 3.50 == 3.5
    assert res["mmmu"]["headline"]["overall"] == 75.0
    multi = [r for r in evaluate.read_json(f"{out}/mmmu_answers.jsonl") if r["question_id"] == "validation_Math_1"]
    assert multi[0]["text"] in ("A", "B")
    # custom: "red." = "Red" and "Two" = "2" after the VQA normalisation, "hi" != "hello": 2 of 3. VQA accuracy only
    # where there are 10 references (c2: 4 say 2 -> every leave-one-out subset keeps >= 3: 100); not a headline
    # number, since it covers 1 of the 3 questions
    custom = res["custom"]["metrics"]
    assert res["custom"]["headline"] == {"exact_match": pytest.approx(200 / 3)} and custom["missing"] == 0
    assert (custom["vqa_accuracy"], custom["vqa_n"], custom["n"]) == (100.0, 1, 3)
    assert custom["categories"] == {"colour": {"exact_match": 50.0, "n": 2},
                                    "count": {"exact_match": 100.0, "n": 1, "vqa_accuracy": 100.0, "vqa_n": 1}}


def test_limit_scores_the_first_questions_against_their_own_ground_truth(setup, tmp_path):
    model, data, prewritten = setup
    out = str(tmp_path)
    for bench in ("vqav2", "pope", "scienceqa"):
        spec = evaluate.BENCHES[bench]
        prewrite(out, bench, evaluate.load_questions(bench, f"{data}/{spec['dir']}/{spec['questions']}"),
                 prewritten[bench])
    res = {r["bench"]: r for r in run(model, data, out, "--bench", "vqav2,pope,scienceqa", "--limit", "2",
                                      "--keep-answers")}
    assert res["vqav2"]["headline"]["accuracy"] == pytest.approx(95.0) and res["vqav2"]["count"] == 2
    assert list(res["pope"]["metrics"]["splits"]) == ["adversarial"]
    assert res["scienceqa"]["headline"] == {"img_acc": 100.0, "acc": 100.0}


def test_an_interrupted_run_resumes(setup, tmp_path):
    model, data, _ = setup
    full = run(model, data, str(tmp_path / "full"), "--bench", "pope", "--batch-size", "2")[0]
    rows = evaluate.read_json(str(tmp_path / "full" / "pope_answers.jsonl"))
    os.makedirs(tmp_path / "cut")
    with open(tmp_path / "cut" / "pope_answers.jsonl", "w") as f:   # killed while writing the third row
        f.write("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2])[:25])
    shutil.copy(tmp_path / "full" / "pope_answers.settings.json", tmp_path / "cut")   # written before any answer
    resumed = run(model, data, str(tmp_path / "cut"), "--bench", "pope", "--batch-size", "2")[0]
    again = evaluate.read_json(str(tmp_path / "cut" / "pope_answers.jsonl"))
    assert [r["answer_id"] for r in again[:2]] == [r["answer_id"] for r in rows[:2]]   # kept, not regenerated
    assert [r["text"] for r in again] == [r["text"] for r in rows] and len(again) == 6
    assert resumed["metrics"] == full["metrics"]


def test_mmvet_judge_through_an_openai_compatible_url(setup, tmp_path, monkeypatch):
    """The official grader's prompt reaches the endpoint; an unparsable reply is retried with the suffix."""
    model, data, prewritten = setup
    prompts = []

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompts.append((body["messages"][0]["content"], body["temperature"], self.headers.get("Authorization")))
            reply = "0.5" if "2+2" in prompts[-1][0] else ("maybe" if len(prompts) < 3 else "1.0 because")
            data_out = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data_out)))
            self.end_headers()
            self.wfile.write(data_out)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MY_KEY", "secret")
    out = str(tmp_path)
    prewrite(out, "mmvet", evaluate.load_questions("mmvet", f"{data}/mm-vet/llava-mm-vet.jsonl"), prewritten["mmvet"])
    try:
        res = run(model, data, out, "--bench", "mmvet", "--judge-url", f"http://127.0.0.1:{server.server_port}/v1",
                  "--judge-key-env", "MY_KEY", "--judge-allow-http", "--keep-answers")[0]
    finally:
        server.shutdown()
    assert res["headline"]["total"] == 75.0      # (0.5 + 1.0) / 2
    assert res["metrics"]["capabilities"] == {"math": 50.0, "ocr": 100.0, "rec": 100.0}
    assert prompts[0][0].endswith("What is 2+2? | 4 | 4 | ") and prompts[0][2] == "Bearer secret"
    sign = [p for p in prompts if "Read the sign" in p[0]]
    assert "STOP <OR> stop | stop | " in sign[0][0] and [p[1] for p in sign] == [0.0, 0.0]
    assert sign[1][0].endswith(evaluate.S.MMVET_RETRY_SUFFIX)


def test_bad_inputs_name_the_file_and_the_record(setup, tmp_path):
    model, data, _ = setup
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "hi"}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"q.jsonl: record 1 is not a pope question"):
        evaluate.load_questions("pope", str(bad))
    bad.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "a"}\n')
    with pytest.raises(ValueError, match="question_id 1 with prompt .a. appears more than once"):
        evaluate.load_questions("pope", str(bad))
    (tmp_path / "nowhere").mkdir()   # a label folder without the labels (a path that is not there: a flag error)
    with pytest.raises(FileNotFoundError, match="nowhere/coco_pope"):
        run(model, data, str(tmp_path / "o"), "--bench", "pope", "--annotations", str(tmp_path / "nowhere"), "--limit",
            "1")
    with pytest.raises(SystemExit):
        run(model, data, str(tmp_path / "o"), "--bench", "nope")

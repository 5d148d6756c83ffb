"""
Evaluate a model on the 8 benchmarks of TinyLLaVA Factory, or on your own data: batched answers in LLaVA's
answer-file format, then the official metrics from scorers.py (pure functions, tested quirk by quirk).

    python evaluate.py --model out/phi2_siglip_base/2_finetune --bench gqa --data ~/llava_eval/gqa
    python evaluate.py --model DIR --bench vqav2,gqa,scienceqa,textvqa,pope,mme,mmvet,mmmu --data ~/llava_eval
    python evaluate.py --model DIR --bench pope --data ~/llava_eval --limit 200 --batch-size 32
    accelerate launch --multi_gpu --num_processes 8 evaluate.py --model DIR --bench gqa --data ~/llava_eval
    python evaluate.py --model DIR --bench custom --questions q.jsonl --annotations refs.jsonl --image-folder img

--model: ours or a TinyLLaVA Factory checkpoint, prompted with its training template (<model>/train_config.json or
--template), or a transformers image-text-to-text folder (LlavaForConditionalGeneration: convert.py to-llava's
export, any compatible Llava), prompted with its processor's chat template. Each process runs on its Accelerate
device (CUDA, MPS, else CPU; --device overrides) in --dtype (auto: bf16 on a GPU with bf16, else fp32, CPUs too:
bf16 changes answers, and is slow without AMX / AVX512-BF16). As N processes (no GPU: ACCELERATE_USE_CPU=1
accelerate launch --multi_gpu ..., README), process r answers every N-th question; rank 0 merges and scores.

--bench custom, your own data: --questions, a LLaVA question file (JSON lines: question_id, image, text, optional
category; the text is asked as it is); --annotations, the references: a line {"question_id": ..., "answers": [...]}
per question ("answer": "..." for one; a VQAv2 annotation file works too); or --data DIR holding questions.jsonl,
answers.jsonl, images/. Scored by exact match with any reference after the official VQA normalisation (EvalAI's),
by VQA accuracy over the questions with 10 references, and per category.

Files are checked before the model loads. Decoding is greedy (--temperature > 0 samples), batched with left padding
and the KV cache. Answers go to <out>/<name>_answers.jsonl, reused only with the settings that made them (a rerun
resumes; answers.py); the same settings make the same file, byte for byte, on any number of processes. Results
(<name>_results.json) are unrounded; a subset (--limit, --questions) is scored against its own ground truth. <name>
is the benchmark's for its official question file, else <bench>-<set>-<hash> (answers.set_name): two question sets
never share a file. A file that cannot be written (a full disk) is one line naming it.
"""
import argparse
import json
import os
import re
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta

import scorers as S
from answers import (DiskError, append, check_answers, disk, fingerprint, image_files, key, load_questions, merge,
                     mme_task_lines, mmvet_submission, on_file, read_json, read_references, set_name, vqav2_submission,
                     write_json)
from settings import DTYPES, TEMPLATES, Choice, Device, Exists, File, Float, Folder, Int, Model, Output, Parser

BENCHES = {  # folder in the eval root; question file, images, ground truth in it (--annotations replaces the first);
    # max_new_tokens; split; where the benchmark's own files come from (the question files: LLaVA's eval.zip)
    "vqav2": dict(dir="vqav2", questions="llava_vqav2_mscoco_test-dev2015.jsonl", images="test2015", gt=[],
                  tokens=128, split="test-dev2015", get="cocodataset.org (images), visualqa.org (annotations)"),
    "gqa": dict(dir="gqa", questions="llava_gqa_testdev_balanced.jsonl", images="data/images", tokens=128,
                gt=["data/testdev_balanced_questions.json"], split="testdev_balanced", get="GQA's site"),
    "scienceqa": dict(dir="scienceqa", questions="llava_test_CQM-A.json", images="images/test", tokens=1024,
                      gt=["problems.json", "pid_splits.json"], split="test", get="github.com/lupantech/ScienceQA"),
    "textvqa": dict(dir="textvqa", questions="llava_textvqa_val_v051_ocr.jsonl", images="train_images", tokens=128,
                    gt=["TextVQA_0.5.1_val.json"], split="val", get="textvqa.org"),
    "pope": dict(dir="pope", questions="llava_pope_test.jsonl", images="val2014", tokens=128, gt=["coco"],
                 split="test", get="cocodataset.org (val2014), github.com/AoiDragon/POPE (output/coco labels)"),
    "mme": dict(dir="MME", questions="llava_mme.jsonl", images="MME_Benchmark_release_version", tokens=128, gt=[],
                split="all", get="the MME authors (github.com/BradyFU/Awesome-Multimodal-Large-Language-Models)"),
    "mmvet": dict(dir="mm-vet", questions="llava-mm-vet.jsonl", images="images", tokens=1024, gt=[], split="v1",
                  get="github.com/yuweihao/MM-Vet"),
    "mmmu": dict(dir="MMMU", questions="anns_for_eval.json", images="all_images", tokens=1024,
                 gt=["eval/answer_dict_val.json"], split="validation", get="TinyLLaVA Factory's MMMU.zip"),
    "custom": dict(dir="custom", questions="questions.jsonl", images="images", tokens=128, gt=["answers.jsonl"],
                   split="custom", get="you (evaluate.py --help: --bench custom)"),
}


# ---------------------------------------------------------------------------- answering (batched generation)
def answer(model, tokenizer, processor, items, image_folder, template, answers_file, batch_size=16,
           max_new_tokens=128, model_id="tinyllava-nano", state=None, settings=None, **generate_kwargs):
    """Answers in LLaVA's format, skipping those on file (a resume). Every process of Accelerate's `state` calls it:
    process r of N answers every N-th question left, rank 0 merges and returns the rows in item order (others: None).
    Batched with left padding and the KV cache, by prompt length inside windows of 8 batches. `model`: ours (prompted
    with `template`; tiled, each image's tokens from its grid) or a transformers one (its processor's chat template,
    image_grids too). answer_id: a UUID named by the settings and the row, so the same answers make the same file."""
    import torch
    from tqdm import tqdm
    from data import collate, encode, image_inputs, load_image
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if rank == 0:
        merge(answers_file, items)   # what an interrupted run left, as one file
    if world > 1:
        state.wait_for_everyone()    # then every rank reads it and splits the questions alike
    done = {key(r) for r in read_json(answers_file)}   # not the shards: the other ranks are writing them now
    todo = [it for it in items if key(it) not in done][rank::world]
    ours = hasattr(model, "num_image_tokens")
    embeddings = (model.language_model if ours else model).get_input_embeddings().weight
    tok = tokenizer if ours else processor.tokenizer
    eos = None if ours else model.generation_config.eos_token_id   # a transformers model's own stop ids too
    eos = sorted({tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    generate_kwargs = {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens, "eos_token_id": eos,
                       "pad_token_id": tok.pad_token_id, **generate_kwargs}
    salt = json.dumps(settings, sort_keys=True)
    model.eval()

    def prompt(it, counts=None):   # ours: token ids (`counts`: each image's tokens, tiled); transformers': text
        several = isinstance(it["image"], list)   # their <image> placeholders are in the text already
        if ours:
            return encode([{"from": "human", "value": ("<image>\n" if it["image"] and not several else "") +
                            it["text"]}], template, tokenizer, counts or model.num_image_tokens,
                          for_generation=True)["input_ids"]
        content = [{"type": "image"}] * bool(it["image"]) + [{"type": "text", "text": it["text"]}]
        content = it["text"] if several else content   # the template places each <image> where the text has it
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def generate(items, prompts):   # the new tokens; a batch's images are in memory only while it runs
        images = [[load_image(os.path.join(image_folder, f)) for f in image_files(it)] for it in items]
        if ours:   # a tiled model's (max_tiles) views, grids and token counts follow each image's shape: re-encoded
            x = [image_inputs(im, processor, model.args.image_aspect_ratio, model.max_tiles, model.num_image_tokens)
                 for im in images]
            prompts = [prompt(it, n) for it, (_, _, n) in zip(items, x)] if model.max_tiles else prompts
            b = collate([{"input_ids": p, "labels": p, "pixel_values": px, "image_grids": g}
                         for p, (px, g, _) in zip(prompts, x)], tok.pad_token_id, padding_side="left")
            b = {k: v.to(embeddings.device) if torch.is_tensor(v) else v for k, v in b.items()}
            return model.generate(b["input_ids"], b["attention_mask"], images=b["images"],
                                  image_grids=b["image_grids"], **generate_kwargs)
        flat = [x for im in images for x in im]
        x = processor(images=flat or None, text=prompts, padding=True, return_tensors="pt")
        x = {k: v.to(embeddings.device, embeddings.dtype if v.is_floating_point() else v.dtype) for k, v in x.items()}
        return model.generate(**x, **generate_kwargs)[:, x["input_ids"].shape[1]:]

    row = lambda it, text: {"question_id": it["question_id"], "prompt": it["prompt"], "text": text,  # noqa: E731
                            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([salt, *key(it), text])).hex,
                            "model_id": model_id, "metadata": {}}
    name = os.path.basename(answers_file)[:-len("_answers.jsonl")] + f" (rank 0 of {world})" * (world > 1)
    bar = tqdm(total=len(todo), desc=name, unit="q", disable=None if rank == 0 else True, dynamic_ncols=True)
    shard = answers_file[:-len(".jsonl")] + f".rank{rank}" * (world > 1) + ".jsonl"   # this process's answers
    with torch.no_grad():
        for w in range(0, len(todo), batch_size * 8):   # a window: sorted by prompt length, written in order
            part = todo[w:w + batch_size * 8]
            texts = {j: it["answer"] for j, it in enumerate(part) if "answer" in it}   # fixed by the benchmark
            prompts = {j: prompt(it) for j, it in enumerate(part) if j not in texts}
            order = sorted(prompts, key=lambda j: len(prompts[j]) if ours else len(tok(prompts[j]).input_ids))
            bar.update(len(texts))
            for i in range(0, len(order), batch_size):
                chunk = order[i:i + batch_size]
                for j, ids in zip(chunk, generate([part[j] for j in chunk], [prompts[j] for j in chunk])):
                    texts[j] = tok.decode(ids, skip_special_tokens=True).strip()
                bar.update(len(chunk))
            append(shard, "".join(json.dumps(row(it, texts[j])) + "\n" for j, it in enumerate(part)))
    bar.close()
    if world > 1:
        state.wait_for_everyone()
    return merge(answers_file, items) if rank == 0 else None


# ------------------------------------------------------------------------- scoring from the native files
def yes_no(texts, parse):
    """yes_ratio: the share `parse` (pope_parse, mme_parse) reads as yes; neither: answers whose first word is
    neither yes nor no (case and punctuation aside), which each benchmark's parser reads its own way."""
    first = [(re.findall(r"[a-z]+", t.lower()) or [""])[0] for t in texts]
    return {"yes_ratio": sum(parse(t) == "yes" for t in texts) / max(len(texts), 1),
            "neither": sum(w not in ("yes", "no") for w in first)}


def score(bench, answers, items, folder, qfile, image_folder, out, a, ask=None):
    """(metrics, headline, (scored, of)) from the benchmark's native ground-truth files, cut to the questions
    asked (module docstring): `scored` of the ground truth's `of` questions (None: no ground truth read). Also
    writes the official converters' files (EvalAI upload, GQA predictions, MME task files, MM-Vet submission) as
    <out>_upload.json, ... (`out`: <out folder>/<the question set's name>, answers.set_name)."""
    asked = {str(it["question_id"]) for it in items}
    gt = lambda name: a.annotations or os.path.join(folder, name)  # noqa: E731
    texts, side = [r["text"] for r in answers], lambda name, obj: write_json(out + name, text=json.dumps(obj))
    if bench == "vqav2":
        result, test_ids, size = {}, os.path.join(folder, "llava_vqav2_mscoco_test2015.jsonl"), None
        if os.path.isfile(test_ids):
            side("_upload.json", vqav2_submission(answers, read_json(test_ids)))
            result["upload_file"] = out + "_upload.json"
        path = gt("v2_mscoco_val2014_annotations.json")
        if os.path.isfile(path):    # val-style annotations: score locally
            anns = read_json(path)
            anns = anns["annotations"] if isinstance(anns, dict) else anns
            mine = [x for x in anns if str(x["question_id"]) in asked]
            few = sum(len(x["answers"]) < 10 for x in mine)   # leave-one-out: 1 reference scores a right answer 0
            if few:
                print(f"warning: {few} of {len(mine)} questions in {path} have fewer than the 10 answers VQA "
                      "accuracy assumes (with 1, a right answer scores 0); --bench custom scores exact match")
            result.update(S.score_vqav2(answers, mine))
            result.pop("per_question")
            size = len(mine), len(anns)
        return result, {"accuracy": result.get("overall", "EvalAI upload")}, size
    if bench == "gqa":
        side("_testdev_balanced_predictions.json",
             [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in answers])
        questions = read_json(gt("data/testdev_balanced_questions.json"))
        result = S.score_gqa(answers, {k: v for k, v in questions.items() if str(k) in asked})
        balanced = sum(bool(q.get("isBalanced")) for q in questions.values())   # only these count
        return result, {"accuracy": result["accuracy"]}, (result["n"], balanced)
    if bench == "scienceqa":
        problems, splits = read_json(gt("problems.json")), read_json(os.path.join(folder, "pid_splits.json"))
        ids = [i for i in splits["test"] if str(i) in asked]
        result = S.score_scienceqa(answers, problems, ids)
        return result, {"img_acc": result["img_acc"], "acc": result["acc"]}, (len(ids), len(splits["test"]))
    if bench == "textvqa":   # m4c scores every answer row (joined by image and question)
        anns = read_json(gt("TextVQA_0.5.1_val.json"))
        anns = anns["data"] if isinstance(anns, dict) else anns
        result = S.score_textvqa(answers, anns)
        return result, {"accuracy": result["accuracy"]}, (len(answers), len(anns))
    if bench == "pope":   # labels pair with answers by position, per split (checked to exist by locate)
        category = {str(it["question_id"]): it["category"] for it in items}
        per_split = Counter(category[str(r["question_id"])] for r in answers)
        labels = {s: read_json(os.path.join(gt("coco"), f"coco_pope_{s}.json")) for s in per_split}
        of = sum(map(len, labels.values()))
        labels = {s: v[:per_split[s]] if a.limit else v for s, v in labels.items()}   # --limit: a split's first
        result = S.score_pope(answers, labels, {r["question_id"]: {"category": category[str(r["question_id"])]}
                                                for r in answers})
        return result, {**{f"{s}_{k}": 100 * v[m] for k, m in (("acc", "accuracy"), ("f1", "f1"))
                           for s, v in result["splits"].items()}, "f1_mean": 100 * result["f1_mean"],
                        **yes_no(texts, S.pope_parse)}, (sum(map(len, labels.values())), of)
    if bench == "mme":
        lines, of = mme_task_lines(answers, a.annotations or image_folder)  # the GT lives beside the images
        with disk(out + "_answers", "create"):
            os.makedirs(out + "_answers", exist_ok=True)
        for task, task_lines in lines.items():  # what calculation.py --results_dir reads
            write_json(f"{out}_answers/{task}.txt", text="".join(x + "\n" for x in task_lines))
        result = S.score_mme(lines, strict=not (a.limit or a.questions))   # a subset may lack whole tasks
        return result, {"perception": result["perception"], "cognition": result["cognition"],
                        **yes_no(texts, S.mme_parse)}, (len(answers), of)
    if bench == "mmvet":
        submission = mmvet_submission(answers)
        side("_submission.json", submission)
        result = {"submission_file": out + "_submission.json"}
        if not ask:
            return result, {"total": "upload the submission (README)"}, None
        meta = read_json(gt("mm-vet.json"))
        mine = {k: v for k, v in meta.items() if k in {f"v1_{i}" for i in asked}}
        grades = grade_mmvet(ask, mine, submission, a.judge_runs, a.judge_model,   # one cache for every set
                             os.path.join(os.path.dirname(out), "mmvet_grades.json"))
        result.update(S.mmvet_scores(grades, mine))
        return result, {"total": result["total"]}, (len(mine), len(meta))
    if bench == "mmmu":   # multiple-choice text is parsed here (MMMU's parser, seeded per question: scorers.py)
        answer_dict = read_json(gt("eval/answer_dict_val.json"))   # the denominator is the answers present
        result = S.score_mmmu(answers, answer_dict, questions=read_json(qfile))
        return result, {"overall": 100 * result["overall"]["acc"]}, (len(answers), len(answer_dict))
    path = gt("answers.jsonl")   # custom
    refs = read_references(path)
    result = S.score_custom(answers, {q: refs[q] for q in asked}, {str(it["question_id"]): it["category"]
                                                                   for it in items if it["category"] is not None})
    full = result.get("vqa_n") == result["n"]   # VQA accuracy heads the table when it covers every question
    return result, {k: result[k] for k in ["exact_match"] + ["vqa_accuracy"] * full}, None


SUBSET_NOTE = ("n of N: a subset, scored against its own questions' ground truth (what the official scorer gives "
               "for a ground-truth file of just those); not comparable with the full benchmark's number")


def table(rows):
    """The headline numbers (rounded here only), a line per category of a custom benchmark; a subset says "n of N
    questions", and a note how it is scored."""
    show = lambda m: "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())  # noqa
    lines = [f"{'benchmark':<10} {'split':<18} {'n':>6} {'seconds':>8}  metrics"]
    for r in rows:
        subset = f"  ({r['scored']} of {r['of']} questions)" * (r["scored"] < r["of"])
        lines.append(f"{r['bench']:<10} {r['split']:<18} {r['count']:>6} {r['seconds']:>8.1f}  {show(r['headline'])}"
                     + subset)
        lines += [f"  {c[:27]:<27} {m['n']:>6} {'':>8}  " + show({k: v for k, v in m.items() if "n" not in k})
                  for c, m in r["metrics"].get("categories", {}).items()]
    return "\n".join(lines + [SUBSET_NOTE] * any(r["scored"] < r["of"] for r in rows))


# -------------------------------- the MM-Vet judge: an OpenAI-compatible endpoint, every grade kept on disk
class JudgeError(RuntimeError):
    """The judge endpoint cannot be used as given (redirect, HTTP error, unreachable); the message says why."""


def openai_compatible_ask(url, model, api_key=None, max_tokens=3, timeout=60, allow_http=False):
    """ask() for an OpenAI-compatible chat-completions URL via urllib; max_tokens=3 and 30 s waits on HTTP 429 as
    the official grader. https:// only (allow_http: http:// too, e.g. a judge on 127.0.0.1). A redirect is an
    error, never followed: urllib would re-send the key to the Location's host and take its reply as the grade."""
    import urllib.error
    import urllib.request
    if not url.lower().startswith(("https://", "http://") if allow_http else "https://"):
        raise ValueError(f"judge URL {url!r}: only https:// (http:// with --judge-allow-http: a local judge)")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):   # instead of a request with the key
            raise JudgeError(f"judge {url}: {code} redirect to {headers.get('Location')}; not followed, key not sent")
    opener = urllib.request.build_opener(NoRedirect)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def ask(prompt, temperature):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": temperature, "max_tokens": max_tokens}).encode()
        while True:
            try:
                with opener.open(urllib.request.Request(url, body, headers), timeout=timeout) as reply:
                    return json.loads(reply.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code != 429:
                    raise JudgeError(f"judge {url} answered HTTP {e.code} {e.reason}") from None
                time.sleep(30)
            except urllib.error.URLError as e:
                raise JudgeError(f"judge {url} not reachable: {e.reason}") from None
    return ask


GRADE_KEY = ("question_id", "question", "answer", "prediction", "judge_model", "run")   # mmvet_grades.json rows


def grade_mmvet(ask, items, submission, runs, judge_model, path):
    """{id: [score per run]} for every item of mm-vet.json (a missing prediction is graded as ''), with the official
    retries (scorers.mmvet_grade). Every grade ever asked for is kept in `path` as it comes and not asked for again:
    a re-run, or one with a larger --limit, pays only for new answers."""
    cache = {tuple(g[k] for k in GRADE_KEY): g["score"] for g in (read_json(path) if os.path.isfile(path) else [])}
    grades = {}
    for qid, item in items.items():
        for run in range(runs):
            k = (qid, item["question"], item["answer"], submission.get(qid, ""), judge_model, run)
            if k not in cache:
                cache[k] = S.mmvet_grade(ask, *k[1:4])[0]
                write_json(path, [dict(zip(GRADE_KEY, k), score=v) for k, v in cache.items()])
            grades.setdefault(qid, []).append(cache[k])
    return grades


# ----------------------------------------------------------------------------------------- the command line
def locate(bench, a, judge):
    """(folder, question file, image folder, items, questions), every file it will read checked: a missing one is a
    one-line FileNotFoundError naming the path and where it comes from, before the model loads."""
    spec, root = BENCHES[bench], a.data or os.path.dirname(os.path.abspath(a.questions))   # a benchmark's, or all
    folder = root if not a.data or os.path.isfile(f"{root}/{spec['questions']}") else f"{root}/{spec['dir']}"
    qfile, image_folder = a.questions or f"{folder}/{spec['questions']}", a.image_folder or f"{folder}/{spec['images']}"
    if not os.path.isfile(qfile):
        raise FileNotFoundError(f"{bench}: no question file {qfile}" + "; it is in LLaVA-1.5's eval.zip (README: "
                                "Evaluation)" * (bench != "custom"))
    questions = load_questions(bench, qfile, getattr(a, "mmmu_multi_image", "answer"))
    items = questions[:a.limit]
    gts = [a.annotations or f"{folder}/{n}" if not i else f"{folder}/{n}" for i, n in enumerate(spec["gt"])]
    if bench == "pope":   # a label file per split asked
        gts = [f"{gts[0]}/coco_pope_{s}.json" for s in sorted({str(it["category"]) for it in items})]
    elif bench == "mme" or bench == "mmvet" and judge:
        gts = [a.annotations or (image_folder if bench == "mme" else f"{folder}/mm-vet.json")]
    elif bench == "vqav2" and not os.path.isfile(f"{folder}/llava_vqav2_mscoco_test2015.jsonl"):   # no upload:
        gts = [a.annotations or f"{folder}/v2_mscoco_val2014_annotations.json"]                      # local score
    pictures = [f"{image_folder}/{f}" for it in items for f in image_files(it)]
    missing = [p for p in pictures if not os.path.isfile(p)]
    for path in gts + missing[:1]:
        if not os.path.exists(path):
            many = f" ({len(missing)} of the {len(pictures)} images asked about are missing)" * (path in missing)
            raise FileNotFoundError(f"{bench}: {path} not found{many}; get it from {spec['get']} (README: Evaluation)")
    refs = read_references(gts[0]) if bench == "custom" else {}
    lack = [str(it["question_id"]) for it in items if str(it["question_id"]) not in refs] * (bench == "custom")
    if lack:
        raise ValueError(f"custom: {gts[0]} has no reference answers for {len(lack)} questions, e.g. {lack[0]!r}")
    return folder, qfile, image_folder, items, questions


def load_model(a, hf, device):
    """(model, tokenizer, processor, dtype name) on `device`, in eval mode: ours, the original's layouts, or (`hf`) a
    transformers image-text-to-text folder as transformers' own model, its batches padded on the left."""
    import torch
    from model import load_pretrained   # every layout (layouts.py: the original's, transformers' Llava)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = a.dtype if a.dtype != "auto" else "bfloat16" if bf16 else "float32"
    model, tokenizer, processor = load_pretrained(a.model, dtype=dtype, trust_remote_code=a.trust_remote_code,
                                                  transformers_ok=hf)
    if hf:
        tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.pad_token or tokenizer.eos_token
    return model.to(device).eval(), tokenizer, processor, dtype


def set_threads(threads, model, device, batch_size):
    """As train.py: `threads`, else 1 thread or all cores, whichever measured faster at the LLM's width (cached)."""
    import torch
    from flops import fastest_threads, machine_name, measured
    if device.type == "cpu":
        lm = model.language_model if hasattr(model, "language_model") else model
        width, rows = lm.get_input_embeddings().embedding_dim, batch_size * 256
        torch.set_num_threads(threads or measured(f"threads|{machine_name(device)}|{width}x{rows}",
                                                  lambda: fastest_threads(width, rows)))


def main(argv=None):
    p = Parser(prog="evaluate.py", description=__doc__, formatter_class=type("Formatter", (
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))   # every default shown
    p.add_argument("--model", required=True, type=Model(), help="ours, a TinyLLaVA Factory or a transformers Llava "
                   "folder")
    p.add_argument("--bench", required=True, help=f"comma-separated: {','.join(BENCHES)}")
    p.add_argument("--data", type=Folder(), help="a benchmark's folder, or the eval root holding them (None: "
                   "--questions' folder)")
    p.add_argument("--image-folder", type=Folder(), help="None: <benchmark folder>/<BENCHES images>")
    p.add_argument("--questions", type=File(), help="question file (one benchmark only)")
    p.add_argument("--annotations", type=Exists(), help="ground truth file (POPE: label folder; one benchmark only)")
    p.add_argument("--template", type=Choice(*TEMPLATES), help="None: the template the model was trained with")
    p.add_argument("--batch-size", type=Int(1, 1024), default=16, help="questions per batch, per process")
    p.add_argument("--limit", type=Int(1, what="a number of questions >= 1 (leave --limit out for all)"),
                   help="only the first N questions (None: all)")
    p.add_argument("--max-new-tokens", type=Int(0), default=0, help="0: the official script's (128 or 1024)")
    p.add_argument("--temperature", type=Float(0), default=0.0, help="0: greedy (the official setting)")
    p.add_argument("--top-p", type=Float(above=0, high=1), help="nucleus sampling, with --temperature > 0")
    p.add_argument("--num-beams", type=Int(1), default=1, help="beam search width")
    p.add_argument("--device", type=Device(), help="e.g. cuda:1, mps, cpu (None: Accelerate's device for this "
                   "process)")
    p.add_argument("--dtype", default="auto", type=Choice("auto", *DTYPES),
                   help="auto: bfloat16 on a GPU with bf16, else float32")
    p.add_argument("--threads", type=Int(1), help="CPU threads (None: 1 or all cores, whichever measured "
                   "faster for the model's width; cached per machine, as train.py)")
    p.add_argument("--out", type=Output(), help="answers and results folder (None: <model>/eval)")
    p.add_argument("--keep-answers", action="store_true", help="score the answers on file, whatever made them")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model's code (OpenELM); never implied")
    p.add_argument("--mmmu-multi-image", default="answer", type=Choice("answer", "guess"), help="MMMU questions with "
                   "several images: answer from all of them, or guess (the original's; the paper's numbers)")
    p.add_argument("--judge-url", help="MM-Vet: an OpenAI-compatible chat-completions URL")
    p.add_argument("--judge-model", default="gpt-4-0613", help="MM-Vet: the judge's model")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-runs", type=Int(1), default=1, help="MM-Vet: grading runs, averaged")
    p.add_argument("--judge-allow-http", action="store_true", help="an http:// --judge-url (a judge on this machine)")
    a = p.parse_args(argv)
    benches = [b.strip() for b in a.bench.split(",") if b.strip()]
    for b in benches:
        if b not in BENCHES:
            p.error(f"unknown benchmark {b!r}; valid: {', '.join(BENCHES)}")
    if len(benches) > 1 and (a.questions or a.annotations or a.image_folder):
        p.error("--questions, --annotations and --image-folder need a single --bench")
    if not (a.data or a.questions):
        p.error("--data (a benchmark's folder or the eval root) or --questions is needed")
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as HF_MODELS
    if Device.missing(a.device):   # (torch is imported now)
        p.error(Device.missing(a.device))
    # the timeout: at the merge, the ranks wait for the slowest, which may take long
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(hours=24))
    if int(os.environ.get("WORLD_SIZE", 1)) != state.num_processes:
        p.error(f"launched as {os.environ['WORLD_SIZE']} processes, but Accelerate runs each alone (no GPU: "
                "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ..., README)")
    config = os.path.join(a.model, "config.json")
    hf = os.path.isfile(config) and read_json(config).get("model_type") in HF_MODELS
    if hf and a.template:
        p.error("--template is for our models; a transformers model is prompted by its processor's chat template")
    template = "processor chat template" if hf else a.template
    if template is None:
        from folders import trained_settings
        saved = trained_settings(a.model)
        if saved is None:
            p.error(f"{a.model}/train_config.json not found: pass --template (the chat template the model was trained "
                    "with)")
        template = saved["template"]
    ask = None
    if a.judge_url and "mmvet" in benches:   # checked before the model loads
        try:
            ask = openai_compatible_ask(a.judge_url, a.judge_model, os.environ.get(a.judge_key_env),
                                          allow_http=a.judge_allow_http)
        except ValueError as e:
            p.error(f"--judge-url: {e}")
    plans = {bench: locate(bench, a, ask) for bench in benches}
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # a "Loading weights" bar per load: noise in the results' log
    model, tokenizer, processor, dtype = load_model(a, hf, torch.device(a.device) if a.device else state.device)
    set_threads(a.threads, model, next(model.parameters()).device, a.batch_size)
    out_dir = a.out or os.path.join(a.model, "eval")
    with disk(out_dir, "create"):
        os.makedirs(out_dir, exist_ok=True)
    weights = fingerprint(a.model, out_dir)
    gen = {"do_sample": a.temperature > 0, "num_beams": a.num_beams,
           **({"temperature": a.temperature, "top_p": a.top_p} if a.temperature > 0 else {})}
    rows = []
    for bench, (folder, qfile, image_folder, items, questions) in plans.items():
        name = set_name(bench, qfile, f"{folder}/{BENCHES[bench]['questions']}")   # every file of this set: name_*
        answers_file = os.path.join(out_dir, f"{name}_answers.jsonl")
        tokens = a.max_new_tokens or BENCHES[bench]["tokens"]
        made = {"model": os.path.abspath(a.model), "weights": weights, "template": template, "dtype": dtype,
                "max_new_tokens": tokens, "temperature": a.temperature, "top_p": a.top_p if a.temperature > 0
                else None, "num_beams": a.num_beams, "image_folder": os.path.abspath(image_folder),   # -> answers
                **({"mmmu_multi_image": a.mmmu_multi_image} if bench == "mmmu" else {})}
        if state.is_main_process:
            settings = check_answers(answers_file, made, a.keep_answers)
            reused = len(on_file(answers_file).keys() & {key(it) for it in items})
        t0 = time.time()
        answers = answer(model, tokenizer, processor, items, image_folder, template, answers_file, a.batch_size,
                         tokens, os.path.basename(os.path.normpath(a.model)), state=state, settings=made, **gen)
        seconds = time.time() - t0
        if not state.is_main_process:
            continue
        metrics, headline, size = score(bench, answers, items, folder, qfile, image_folder, f"{out_dir}/{name}", a,
                                        ask)
        scored, of = size or (len(items), len(questions))   # no ground truth read: the question file's
        result = {"model": a.model, "bench": bench, "split": BENCHES[bench]["split"] if not a.questions else
                  os.path.splitext(os.path.basename(qfile))[0], "questions": os.path.abspath(qfile), "name": name,
                  "count": len(answers), "reused": reused,
                  "scored": scored, "of": of, "seconds": seconds, "template": template, "answer_settings": settings,
                  "headline": headline, "metrics": metrics}
        write_json(os.path.join(out_dir, f"{name}_results.json"), result)
        rows.append(result)
    if state.is_main_process:
        print(f"model {a.model} (template {template}, {dtype}, {state.num_processes} process(es))\n" + table(rows)
              + f"\nanswers and results in {out_dir}: " + ", ".join(f"{r['name']}_*" for r in rows))
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, DiskError, ValueError, JudgeError) as e:   # the messages name the file or option
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)

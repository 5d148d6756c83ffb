"""Scorers for the 8 benchmarks of TinyLLaVA Factory and your own (score_custom), scoring as the official scorers do.

Pure functions of LLaVA's answer rows ({"question_id", "prompt", "text", ...}) and the benchmark's native files,
parsed: no model, no torch, no network (evaluate.score reads the files and shows every call).

    ev.score_pope(rows, {"random": [json.loads(l) for l in open("coco_pope_random.json")]})["f1_mean"]
    ev.SCORERS["pope"] is ev.score_pope           # name -> function; ev.get_scorer("nope") lists the valid names

Conventions shared by all scorers (the official scripts differ, see eval_metrics.md): rows are joined to the
ground truth by str(id); when one id has several rows the last row wins (except TextVQA and POPE, whose official
scripts score every row); the ground truth defines the question set and a question without a prediction
counts as wrong and is reported as "missing" (GQA/VQAv2 crash instead); a 0/0 is 0.0 and is never raised.
"""

import math
import random
import re
from collections import Counter, defaultdict

# Re-implemented from GT-Vision-Lab/VQA vqaEval.py (master), LLaVA llava/eval/{m4c_evaluator,eval_science_qa,
# eval_textvqa}.py + scripts/convert_*, TinyLLaVA eval_pope.py, GQA eval.py, MME calculation.py, MMMU eval_utils.py +
# main_eval_only.py, MM-Vet mm-vet_evaluator.py. "Quirk N" = shared/reference/eval_metrics.md, pinned by tests.


def _div(a, b):
    return a / b if b else 0.0  # every 0/0 of the official scripts (a ZeroDivisionError there) is 0.0 here


# ---- VQA answer normalisation (vqaEval.py and m4c's EvalAIAnswerProcessor share it) -------------------------------
_CONTRACTIONS = dict(pair.split(">") for pair in (  # key>value; "Im", "Ive", "Id've" are capitalised (quirk 4)
    "aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've "
    "couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've hadn'tve>hadn't've "
    "hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's "
    "Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll "
    "let's>let's maam>ma'am mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've mightve>might've "
    "mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at "
    "'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've "
    "shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd "
    "somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's "
    "someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll someones>someone's "
    "somethingd>something'd somethingd've>something'd've something'dve>something'd've somethingll>something'll "
    "thats>that's thered>there'd thered've>there'd've there'dve>there'd've therere>there're theres>there's "
    "theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas "
    "wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're whats>what's "
    "whatve>what've whens>when's whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've "
    "who'dve>who'd've wholl>who'll whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't "
    "wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll "
    "y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've "
    "you'dve>you'd've youll>you'll youre>you're youve>you've").split())
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # nothing beyond ten (quirk 4)
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"\.(?!\d)")  # the original's "(?!<=\d)" is a no-op look-ahead, so: a period not before a digit
_VQA_COMMA = re.compile(r"\d,\d")  # vqaEval's digit-comma-digit test
_M4C_COMMA = re.compile(r"\d,+\d")  # m4c's variant (never fires there: its tokenizer has deleted all commas)


def _punctuation(text, comma_re):
    """Quirk 3: a mark next to a space (in the input) is deleted, elsewhere it becomes a space; a digit-comma-digit
    deletes them all; then at most 32 periods not before a digit go (re.UNICODE == 32 is passed as the count)."""
    delete_all = comma_re.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)


def _digits_articles(text):
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_normalize(text):
    """vqaEval.py's processPunctuation + processDigitArticle."""
    return _digits_articles(_punctuation(text, _VQA_COMMA))


def eval_ai_answer(text):
    """m4c EvalAIAnswerProcessor: lowercase, drop ',' and '?', "'s" -> " 's", then the same steps as vqaEval."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text, _M4C_COMMA))


def _soft_accuracy(pred, gts):
    """Quirk 2: mean over leave-one-annotator-out subsets of min(1, matches/3) (vqaEval compares whole answer dicts,
    = by position since each carries a unique answer_id)."""
    hits = sum(g == pred for g in gts)
    return _div(sum(min(1, (hits - (g == pred)) / 3) for g in gts), len(gts))


def score_vqav2(answers, annotations, eval_ai_processor=True):
    """vqaEval on val-style annotations ({"annotations": [...]} or the list); normalisation only when the answers
    are not unanimous (quirk 1). eval_ai_processor=True first applies EvalAIAnswerProcessor as LLaVA does before
    uploading (= what EvalAI reports for that upload); False scores the raw text. Percentages rounded to 2 as
    vqaEval stores them: means of unrounded per-question values; per_question holds the rounded ones."""
    preds = {str(r["question_id"]): r["text"] for r in answers}
    anns = annotations["annotations"] if isinstance(annotations, dict) else annotations
    ws = lambda text: text.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    accs, per_question, by_atype, by_qtype, missing = [], {}, defaultdict(list), defaultdict(list), 0
    for ann in anns:
        pred = preds.get(str(ann["question_id"]))
        missing += pred is None
        pred = ws(eval_ai_answer(pred or "") if eval_ai_processor else pred or "")
        gts = [ws(a["answer"]) for a in ann["answers"]]
        if len(set(gts)) > 1:
            gts, pred = [vqa_normalize(g) for g in gts], vqa_normalize(pred)
        acc = _soft_accuracy(pred, gts)
        accs.append(acc)
        per_question[ann["question_id"]] = round(100 * acc, 2)
        by_atype[ann.get("answer_type")].append(acc)
        by_qtype[ann.get("question_type")].append(acc)
    mean = lambda xs: round(100 * _div(sum(xs), len(xs)), 2)  # noqa: E731
    return {"overall": mean(accs), "per_answer_type": {k: mean(v) for k, v in by_atype.items()},
            "per_question_type": {k: mean(v) for k, v in by_qtype.items()}, "per_question": per_question,
            "n": len(accs), "missing": missing}


def score_gqa(answers, questions):
    """GQA: text.rstrip('.').lower() then exact match (quirk 6); isBalanced questions only; open = structural type
    query, binary = the others (quirk 7). Percentages, unrounded (eval.py prints .2f)."""
    preds = {str(r["question_id"]): r["text"].rstrip(".").lower() for r in answers}
    by_type, missing = defaultdict(list), 0
    for qid, q in questions.items():
        if q.get("isBalanced"):
            missing += str(qid) not in preds
            by_type[q["types"]["structural"]].append(preds.get(str(qid)) == q["answer"])
    pct = lambda hits: 100 * _div(sum(hits), len(hits))  # noqa: E731
    every = [h for hits in by_type.values() for h in hits]
    return {"accuracy": pct(every), "binary": pct([h for t, hits in by_type.items() if t != "query" for h in hits]),
            "open": pct(by_type.get("query", [])), "per_structural_type": {t: pct(h) for t, h in by_type.items()},
            "n": len(every), "missing": missing}


_SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text):
    """Quirk 8: an exact letter; else 'X. '; else exactly one 'The answer is ([A-Z]).' match; else 'FAILED'."""
    if text in _SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in _SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score_scienceqa(answers, problems, split_ids):
    """ScienceQA acc over split_ids and img_acc over rows whose prompt has '<image>' (quirk 9); a missing prediction
    is wrong and outside the image subset; a letter beyond the choices is wrong. Percentages, unrounded."""
    preds = {str(r["question_id"]): r for r in answers}
    correct = total = img_correct = img_total = missing = 0
    for pid in dict.fromkeys(str(i) for i in split_ids):
        if pid not in problems:
            raise ValueError(f"ScienceQA split id {pid!r} is not in problems.json")
        prob, row = problems[pid], preds.get(pid)
        missing += row is None
        letter = scienceqa_parse(row["text"]) if row else "FAILED"
        hit = letter in _SQA_OPTIONS[:len(prob["choices"])] and _SQA_OPTIONS.index(letter) == prob["answer"]
        in_img = row is not None and "<image>" in row["prompt"]
        correct, total = correct + hit, total + 1
        img_correct, img_total = img_correct + (hit and in_img), img_total + in_img
    return {"acc": 100 * _div(correct, total), "img_acc": 100 * _div(img_correct, img_total), "correct": correct,
            "total": total, "img_correct": img_correct, "img_total": img_total, "missing": missing}


def textvqa_question(prompt):
    """LLaVA eval_textvqa.py prompt_processor: recover the lowercased question from the saved prompt."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise ValueError(f"TextVQA prompt has no 'Question: ... Short answer:': {prompt!r}")
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif "Reference OCR token: " in prompt and len(lines) == 2:
        question = lines[1].replace("Question: ", "")
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"cannot recover the TextVQA question from prompt {prompt!r}")
    if question.startswith("Question: "):
        question = question.replace("Question: ", "")
    return question.lower()


def score_textvqa(answers, annotations):
    """m4c TextVQA accuracy over every row, joined by (image id, question from the prompt) (quirk 11), prediction
    and the 10 answers through EvalAIAnswerProcessor (quirk 10). annotations: {"data": [...]} or the list."""
    data = annotations["data"] if isinstance(annotations, dict) else annotations
    gts = {(str(a["image_id"]), a["question"].lower()): a["answers"] for a in data}
    scores = []
    for r in answers:
        key = (str(r["question_id"]), textvqa_question(r["prompt"]))
        if key not in gts:
            raise ValueError(f"TextVQA row {key} has no annotation with that image id and question")
        if len(gts[key]) != 10:
            raise ValueError(f"TextVQA question {key} has {len(gts[key])} answers; m4c requires exactly 10")
        scores.append(_soft_accuracy(eval_ai_answer(r["text"]), [eval_ai_answer(a) for a in gts[key]]))
    return {"accuracy": 100.0 * _div(sum(scores), len(scores)), "n": len(scores)}


def pope_parse(text):
    """Quirk 12: before the first '.', no commas, split on ' '; 'no' iff a word is 'No', 'no' or 'not'."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def score_pope(answers, labels_by_split, questions=None, eps=1e-6):
    """POPE per split: the split's rows (category from questions[id], else row["category"]) pair with its labels
    (rows or strings; 'no' negative, else positive) by POSITION (quirk 13), unequal counts are an error (the
    official zip() truncates). eps: TinyLLaVA's guard in precision, recall, F1 (0 = LLaVA's); 0/0 = 0.0 (quirk 14)."""
    category = (lambda r: r["category"]) if questions is None else (lambda r: questions[r["question_id"]]["category"])
    splits = {}
    for split, labels in labels_by_split.items():
        preds = [pope_parse(r["text"]) == "yes" for r in answers if category(r) == split]
        gold = [(lab["label"] if isinstance(lab, dict) else lab) != "no" for lab in labels]
        if len(preds) != len(gold):
            raise ValueError(f"POPE {split}: {len(preds)} answers but {len(gold)} labels; they pair by position")
        pairs = Counter(zip(preds, gold))  # (predicted yes, label yes)
        tp, fp, tn, fn = pairs[True, True], pairs[True, False], pairs[False, False], pairs[False, True]
        precision, recall = _div(tp, tp + fp + eps), _div(tp, tp + fn + eps)
        splits[split] = {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": _div(tp + tn, tp + tn + fp + fn),
                         "precision": precision, "recall": recall, "yes_ratio": _div(sum(preds), len(preds)),
                         "f1": _div(2 * precision * recall, precision + recall + eps), "n": len(preds)}
    return {"splits": splits, "f1_mean": _div(sum(s["f1"] for s in splits.values()), len(splits))}


MME_TASKS = {"perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                            "artwork", "OCR"],
             "cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]}


class MMEFormatError(ValueError):
    """The MME task files cannot be scored as they are; the message lists every problem found."""


def mme_parse(pred):
    """Quirk 15: lowercase; exactly yes/no; else 'yes', then 'no', inside the first 4 characters; else 'other'."""
    pred = pred.lower()
    if pred in ("yes", "no"):
        return pred
    return "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"


def score_mme(rows_by_task, strict=True):
    """MME: task -> its answers file (text or lines 'image<TAB>question<TAB>gt<TAB>prediction'). acc, acc+ over
    CONSECUTIVE line pairs, score = 100*acc + 100*acc+, perception/cognition sums (quirk 16). Instead of
    calculation.py's crashes (quirk 17) we list problems: missing or empty task, odd line count, a line without 4
    tab fields (a tab/newline in a prediction: write them as spaces), gt not yes/no, a pair with two images.
    strict: raise MMEFormatError; else score the clean tasks, a category with a bad task is None. All-'other' -> 0."""
    problems, tasks = [], {}
    for task in MME_TASKS["perception"] + MME_TASKS["cognition"]:
        if task not in rows_by_task:
            problems.append(f"{task}: task file missing")
            continue
        lines = rows_by_task[task]
        if isinstance(lines, str):  # as readlines(): "a\nb\n" is 2 lines, "" is none
            lines = lines.split("\n")[:-1] if lines.endswith("\n") or not lines else lines.split("\n")
        rows = [line.rstrip("\r\n").split("\t") for line in lines]
        bad = [f"{task} line {i}: " + (f"{len(r)} tab-separated fields, expected 4" if len(r) != 4 else
                                        f"ground truth {r[2]!r} is not yes/no")
               for i, r in enumerate(rows, 1) if len(r) != 4 or r[2].lower() not in ("yes", "no")]
        if not rows or len(rows) % 2:
            bad.append(f"{task}: {len(rows)} lines; expected an even, non-zero number (2 questions per image)")
        elif not bad:
            bad += [f"{task} lines {i + 1}-{i + 2}: a pair must share its image ({rows[i][0]!r} != {rows[i + 1][0]!r})"
                    for i in range(0, len(rows), 2) if rows[i][0] != rows[i + 1][0]]
        if bad:
            problems += bad
            continue
        preds = [mme_parse(r[3]) for r in rows]
        hits = [p == r[2].lower() for p, r in zip(preds, rows)]
        acc = sum(hits) / len(hits)
        acc_plus = sum(hits[i] and hits[i + 1] for i in range(0, len(hits), 2)) / (len(hits) // 2)
        tasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc * 100 + acc_plus * 100,
                       "other": preds.count("other"), "n": len(rows)}
    if problems and strict:
        raise MMEFormatError("MME files cannot be scored:\n  " + "\n  ".join(problems))
    result = {"tasks": tasks, "errors": problems}
    for category, names in MME_TASKS.items():
        result[category] = sum(tasks[t]["score"] for t in names) if all(t in tasks for t in names) else None
    return result


MMMU_DOMAINS = {  # MMMU's DOMAIN_CAT2SUB_CAT
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"]}
_MMMU_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
_NUMBER_PATTERNS = [re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"), re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
                    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")]  # 1,234 / 1e5 / 1.5


def mmmu_rng(question_id, seed=42):
    """MMMU's guesses come from `random` seeded once (42), so they depend on question order (TinyLLaVA: unseeded).
    Ours depend on the question alone: random.Random(f"{seed}:{question_id}") (SHA-512 of the string: stable)."""
    return random.Random(f"{seed}:{question_id}")


def mmmu_parse_choice(response, all_choices, index2ans, rng):
    """Quirk 18: '(X)', then ' X ', then (over 5 words) option text; the last mentioned wins (ties: the first
    candidate); no candidate: rng.choice(all_choices)."""
    for ch in ",.!?;:'":  # one character at a time, as the original: "B,." keeps its ","
        response = response.strip(ch)
    padded = " " + response + " "
    found = [c for c in all_choices if f"({c})" in padded]
    where = lambda c: padded.rfind(f"({c})")  # noqa: E731
    if not found:
        found = [c for c in all_choices if f" {c} " in padded]
        where = lambda c: padded.rfind(f" {c} ")  # noqa: E731
    if not found and len(padded.split()) > 5:
        found = [k for k, text in index2ans.items() if text.lower() in padded.lower()]
        where = lambda k: padded.lower().rfind(index2ans[k].lower())  # noqa: E731
    if not found:
        return rng.choice(all_choices)
    return max(found, key=where)


def _mmmu_normalize(text):
    text = str(text).strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]  # a 1-char answer must stand alone


def mmmu_parse_open(response):
    """Quirk 19: per line (the sentence regex runs after lower(): only newlines split) the shortest tail after an
    indicator ('=' too on the last line), plus its numbers; normalised: lowercase, numbers rounded to 2."""
    response = response.strip().strip(".").lower()
    lines, keys = response.split("\n"), []
    for i, line in enumerate(lines):
        shortest = None
        for indicator in _MMMU_INDICATORS + (["="] if i == len(lines) - 1 else []):
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response]
    found = keys + [n for k in keys for pattern in _NUMBER_PATTERNS for n in pattern.findall(k)]
    return list(dict.fromkeys(x for f in found for x in _mmmu_normalize(f)))


def mmmu_open_correct(gold, candidates):
    """Quirk 20: a text gold must be a substring of a text candidate; a number must equal a number."""
    golds = [g for one in (gold if isinstance(gold, list) else [gold]) for g in _mmmu_normalize(one)]
    return any(any(isinstance(g, str) and g in c for g in golds) if isinstance(c, str) else c in golds
               for c in candidates)


def score_mmmu(answers, answer_dict, questions=None, seed=42):
    """MMMU main_eval_only. Multiple choice text is parsed with mmmu_parse_choice given `questions`
    (anns_for_eval.json), else taken as parsed (TinyLLaVA parses while generating), then compared exactly. The
    denominator is the predictions present; domain/overall weighted by count (quirk 21). Fractions, unrounded (MMMU
    prints 3 decimals); ids outside answer_dict or the 30 subjects are returned in "unknown_ids"."""
    info = {str(q["id"]): q for q in questions or []}
    preds = {str(r["question_id"]): r["text"] for r in answers}
    hits, unknown = defaultdict(list), []
    subjects = {s for names in MMMU_DOMAINS.values() for s in names}
    for qid, text in preds.items():
        subject = "_".join(qid.split("_")[1:-1])
        if qid not in answer_dict or subject not in subjects:
            unknown.append(qid)
            continue
        gold, q = answer_dict[qid]["ground_truth"], info.get(qid)
        if answer_dict[qid]["question_type"] == "multiple-choice":
            pred = mmmu_parse_choice(text, q["all_choices"], q["index2ans"], mmmu_rng(qid, seed)) if q else text
            hits[subject].append(pred in gold if isinstance(gold, list) else pred == gold)
        else:
            hits[subject].append(mmmu_open_correct(gold, mmmu_parse_open(text)))
    acc = {s: sum(h) / len(h) for s, h in hits.items()}

    def weighted(names):  # calculate_ins_level_acc; overall sums subjects in MMMU's CAT_SHORT2LONG order = sorted
        num = sum(len(hits[s]) for s in names if s in acc)
        return {"num": num, "acc": _div(sum(acc[s] * len(hits[s]) for s in names if s in acc), num)}

    return {"overall": weighted(sorted(acc)), "domains": {d: weighted(names) for d, names in MMMU_DOMAINS.items()},
            "subjects": {s: {"num": len(hits[s]), "acc": acc[s]} for s in acc}, "unknown_ids": unknown}


# ---- Your own benchmark (evaluate.py --bench custom) ---------------------------------------------------------------
def score_custom(answers, references, categories=None):
    """Exact match: the prediction equals a reference, both through EvalAIAnswerProcessor (the official VQA
    normalisation, on both sides as m4c); VQA accuracy (quirk 2) over the questions with exactly 10 references;
    overall and per category ({id: name}). The references {id: [text]} are the questions. Percentages."""
    preds = {str(r["question_id"]): eval_ai_answer(r["text"]) for r in answers}
    groups = defaultdict(lambda: ([], []))  # None (all) and each category -> (exact hits, VQA accuracies)
    for qid, refs in references.items():
        pred, gts = preds.get(str(qid)), [eval_ai_answer(g) for g in refs]
        for name in {None, (categories or {}).get(str(qid))}:
            groups[name][0].append(pred in gts)
            groups[name][1].extend([_soft_accuracy(pred, gts)] * (len(gts) == 10))
    pct = lambda xs: 100 * _div(sum(xs), len(xs))  # noqa: E731
    summary = lambda hits, accs: {"exact_match": pct(hits), "n": len(hits), **(  # noqa: E731
        {"vqa_accuracy": pct(accs), "vqa_n": len(accs)} if accs else {})}
    return {**summary(*groups.pop(None, ([], []))), "missing": sum(str(q) not in preds for q in references),
            "categories": {c: summary(*g) for c, g in sorted(groups.items())}}


# ---- MM-Vet: the GPT-4 grader made testable (the judge is an injected function) ----------------------------------
MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # the official few-shot table, byte for byte (quirk 22)
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
MMVET_TEMPERATURES = (0.0, 0.0, 0.5, 1.0, 1.5, 2.0)  # first try, then 5 retries with the suffix


def mmvet_grader_prompt(question, answer, prediction, retry=False):
    answer = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_PROMPT + "\n" + " | ".join([question, answer, prediction, ""]) + (MMVET_RETRY_SUFFIX if retry else "")


def mmvet_parse_grade(reply):
    """The first space-separated token as a float in [0, 1], else None. (NaN passes the official check; not ours.)"""
    try:
        score = float(reply.split(" ")[0].strip())
    except (AttributeError, ValueError):
        return None
    return score if 0.0 <= score <= 1.0 else None


def mmvet_grade(ask, question, answer, prediction):
    """(score, replies) with the official schedule; ask(prompt, temperature) -> str. The reply to the 5th retry is
    never parsed: 0.0, as the official."""
    replies = []
    for attempt, temperature in enumerate(MMVET_TEMPERATURES):
        replies.append(ask(mmvet_grader_prompt(question, answer, prediction, retry=attempt > 0), temperature))
        score = mmvet_parse_grade(replies[-1]) if attempt < len(MMVET_TEMPERATURES) - 1 else None
        if score is not None:
            return score, replies
    return 0.0, replies


def _np_round(x, decimals):
    return round(x * 10 ** decimals) / 10 ** decimals  # numpy's rounding (scale, round half even, unscale)


def mmvet_scores(grades, capability_map, decimals=1):
    """Quirk 23: per run sum/count*100 (count from capability_map: ungraded items add 0), mean over runs, numpy-
    rounded. grades {id: score | [per run]}; capability_map mm-vet.json or {id: [caps]}. "integrations" are named
    by the sorted capability set (the official joins a Python set: names vary with PYTHONHASHSEED)."""
    caps = {k: frozenset(v["capability"] if isinstance(v, dict) else v) for k, v in capability_map.items()}
    grades = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in grades.items() if k in caps}
    runs = max((len(v) for v in grades.values()), default=1)
    count, sets = Counter(c for cs in caps.values() for c in cs), Counter(caps.values())
    sums = defaultdict(lambda: [0.0] * runs)
    for qid, scores in grades.items():
        for i, score in enumerate(scores):
            for key in [*caps[qid], "total", caps[qid]]:
                sums[key][i] += score
    per_run = lambda key, n: [s / n * 100 for s in sums[key]]  # noqa: E731
    mean = lambda xs: _np_round(sum(xs) / len(xs), decimals)  # noqa: E731
    totals = per_run("total", len(caps) or 1)
    m = sum(totals) / runs
    spread = math.sqrt(sum((t - m) * (t - m) for t in totals) / runs)  # numpy's population std
    return {"capabilities": {c: mean(per_run(c, n)) for c, n in count.most_common()}, "total": mean(totals),
            "std": _np_round(spread, decimals), "runs": [_np_round(t, decimals) for t in totals],
            "integrations": {"_".join(sorted(s)): mean(per_run(s, n)) for s, n in sets.most_common()}}


SCORERS = {"vqav2": score_vqav2, "gqa": score_gqa, "scienceqa": score_scienceqa, "textvqa": score_textvqa,
           "pope": score_pope, "mme": score_mme, "mmmu": score_mmmu, "mmvet": mmvet_scores, "custom": score_custom}


def get_scorer(name):
    if name not in SCORERS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(SCORERS)}")
    return SCORERS[name]

"""Scorers in scorers.py (and answers.py's files for the official tools) against hand-derived values, one or more
cases per quirk of shared/reference/eval_metrics.md (the "qN" in a test name). Inputs are tiny literals in each
benchmark's native format; every expected value is derived in the comment next to it from the official rules.
Pure Python, < 1 s."""
import random
import subprocess
import sys
from pathlib import Path

import pytest

import scorers as ev
from answers import MMMU_MULTI_IMAGE_OPEN, mmmu_multi_image_answer, mmvet_submission, vqav2_submission

ROOT = Path(__file__).resolve().parents[1]


def rows(*pairs, prompt="<image>\nq"):
    """LLaVA answer-jsonl rows from (question_id, text) pairs."""
    return [{"question_id": q, "prompt": prompt, "text": t, "answer_id": "x", "model_id": "m", "metadata": {}}
            for q, t in pairs]


def test_importable_without_torch():
    code = "import sys; sys.modules['torch'] = None; import scorers; print(len(scorers.SCORERS))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "9"   # the 8 benchmarks and a custom one


def test_get_scorer_lists_valid_names():
    assert ev.get_scorer("pope") is ev.score_pope
    with pytest.raises(ValueError, match="vqav2, gqa, scienceqa"):
        ev.get_scorer("pop")


# ---------------------------------------------------------------------------------------------------------- VQAv2
def vqa_ann(qid, answers, atype="other", qtype="what"):
    return {"question_id": qid, "image_id": 1, "answer_type": atype, "question_type": qtype,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def test_vqav2_q1_normalisation_only_when_gt_not_unanimous():
    anns = {"annotations": [vqa_ann(1, ["yes"] * 10)]}
    # Unanimous GT: the raw prediction is only \n/\t-replaced and stripped, so "Yes" != "yes" and "yes." != "yes".
    assert ev.score_vqav2(rows((1, "Yes")), anns, eval_ai_processor=False)["overall"] == 0.0
    assert ev.score_vqav2(rows((1, "yes.")), anns, eval_ai_processor=False)["overall"] == 0.0
    assert ev.score_vqav2(rows((1, " yes\n")), anns, eval_ai_processor=False)["overall"] == 100.0  # strip applies
    # Same GT but 9 x "yes" + 1 x "no": normalisation runs, "Yes" -> "yes" matches 9 annotators -> 1.0.
    anns = {"annotations": [vqa_ann(1, ["yes"] * 9 + ["no"])]}
    assert ev.score_vqav2(rows((1, "Yes")), anns, eval_ai_processor=False)["overall"] == 100.0
    # Through EvalAIAnswerProcessor (what LLaVA uploads, our default) "Yes" becomes "yes" before vqaEval sees it.
    assert ev.score_vqav2(rows((1, "Yes.")), {"annotations": [vqa_ann(1, ["yes"] * 10)]})["overall"] == 100.0


def test_vqav2_q2_leave_one_out_and_rounding():
    other = ["cat", "cow", "pig", "emu", "elk", "yak", "ant", "bee", "owl", "rat"]
    anns = {"annotations": [vqa_ann(k, ["dog"] * k + other[k:]) for k in (1, 2, 3, 4)]
            + [vqa_ann(5, other, atype="number")]}
    res = ev.score_vqav2(rows((1, "dog"), (2, "dog"), (3, "dog"), (4, "dog"), (5, "dog")), anns)
    # k matching annotators: 10 - k subsets keep all k, k subsets keep k - 1.
    # k=1: (9*1/3 + 1*0)/10 = 0.3;  k=2: (8*2/3 + 2*1/3)/10 = 0.6;  k=3: (7*1 + 3*2/3)/10 = 0.9;
    # k=4: every subset keeps >= 3 -> 1.0;  k=0: 0.  Per question: round(100 * acc, 2).
    assert res["per_question"] == {1: 30.0, 2: 60.0, 3: 90.0, 4: 100.0, 5: 0.0}
    # Overall = round(100 * mean of unrounded accs, 2) = 100 * (0.3+0.6+0.9+1.0+0)/5 = 56.0.
    assert res["overall"] == 56.0
    # Per answer type: "other" = (0.3+0.6+0.9+1.0)/4 = 0.7 -> 70.0; "number" = 0.0.
    assert res["per_answer_type"] == {"other": 70.0, "number": 0.0}
    assert res["n"] == 5 and res["missing"] == 0


def test_vqav2_q2_missing_prediction_counts_as_empty_answer():
    anns = {"annotations": [vqa_ann(1, ["dog"] * 10), vqa_ann(2, ["dog"] * 10)]}
    res = ev.score_vqav2(rows((1, "dog")), anns)  # question 2 has no row: '' scores 0 -> (1 + 0) / 2 = 50.0
    assert (res["overall"], res["missing"]) == (50.0, 1)


@pytest.mark.parametrize("text, expected", [
    ("t-shirt", "t shirt"),            # '-' touches no space -> becomes a space
    ("t-shirt - red", "tshirt red"),   # ' -' occurs, so every '-' is deleted
    ("1,000 t-shirt", "1000 tshirt"),  # digit-comma-digit anywhere: all punctuation deleted
    ("it's 5:30 & #1 $2", "it's 5:30 & #1 $2"),  # ' : & # $ are not punctuation
    ("3.5 .5 end.", "3.5 .5 end"),     # a period before a digit stays, others go
    ("a.b", "ab"),                     # ...even inside a word ("a" is no longer an article then)
    ("yes" + "." * 32, "yes"),         # 32 periods: all removed
    ("yes" + "." * 33, "yes."),        # 33: re.UNICODE (32) was passed as the count, one survives
])
def test_vqav2_q3_punctuation(text, expected):
    assert ev.vqa_normalize(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("two dogs", "2 dogs"), ("None", "0"), ("zero", "0"), ("ten", "10"),
    ("eleven", "eleven"),              # only none, zero..ten are mapped
    ("The Dog", "dog"), ("an apple a day", "apple day"),
    ("dont", "don't"), ("Dont", "don't"),  # lowercased first, then the table
    ("Im", "im"), ("Ive", "ive"),      # the table's keys "Im"/"Ive" are capitalised: never hit after lower()
])
def test_vqav2_q4_digits_articles_contractions(text, expected):
    assert ev.vqa_normalize(text) == expected


def test_vqav2_q4_im_through_the_scorer():
    anns = {"annotations": [vqa_ann(1, ["i'm"] * 5 + ["im"] * 5)]}
    # Not unanimous -> normalised; "Im" -> "im" (not "i'm"), matching the 5 "im" annotators -> 1.0
    assert ev.score_vqav2(rows((1, "Im")), anns, eval_ai_processor=False)["per_question"] == {1: 100.0}
    anns = {"annotations": [vqa_ann(1, ["i'm"] * 9 + ["ok"])]}  # "Im" never becomes "i'm": 0 matches
    assert ev.score_vqav2(rows((1, "Im")), anns, eval_ai_processor=False)["per_question"] == {1: 0.0}


def test_vqav2_q5_submission():
    answers = rows((3, "Two dogs."), (1, "What's up, doc?"), (3, "Yes"))  # duplicate id 3: the last row wins
    test_ids = [{"question_id": 1, "image": "x.jpg"}, {"question_id": 2}, {"question_id": 3}]
    # "What's up, doc?": lower, drop ',' '?', "'s" -> " 's" -> "what 's up doc"; 2 is missing -> ''.
    assert vqav2_submission(answers, test_ids) == [
        {"question_id": 1, "answer": "what 's up doc"}, {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "yes"}]
    # "Two dogs." -> "two dogs" (period stripped) -> "2 dogs"
    assert vqav2_submission(rows((7, "Two dogs.")), [7]) == [{"question_id": 7, "answer": "2 dogs"}]


# ------------------------------------------------------------------------------------------------------------ GQA
def gqa_q(answer, structural, balanced=True):
    return {"answer": answer, "isBalanced": balanced, "question": "q?", "types": {"structural": structural}}


def test_gqa_q6_conversion_is_rstrip_period_and_lower_only():
    questions = {str(i): gqa_q("yes" if i < 7 else "man", "verify") for i in range(1, 9)}
    answers = rows(("1", "Yes."), ("2", "yes.."), ("3", "Yes. "), ("4", " yes"), ("5", "yes\n"),
                   ("6", "YES"), ("7", "the man"), ("8", "Man."))
    # right: "Yes."->yes, "yes.."->yes, "YES"->yes, "Man."->man; wrong: "yes. " (period not last),
    # " yes", "yes\n", "the man".  4 / 8 = 50%.
    res = ev.score_gqa(answers, questions)
    assert res["accuracy"] == 50.0 and res["n"] == 8


def test_gqa_q7_balanced_only_and_binary_open():
    questions = {"1": gqa_q("yes", "verify"), "2": gqa_q("no", "logic"), "3": gqa_q("red", "query"),
                 "4": gqa_q("left", "choose"), "5": gqa_q("cup", "query"), "6": gqa_q("x", "query", balanced=False),
                 "7": gqa_q("yes", "compare")}
    answers = rows(("1", "yes"), ("2", "yes"), ("3", "red"), ("4", "left"), ("5", "mug"), ("6", "x"))
    res = ev.score_gqa(answers, questions)
    # Balanced: 1 ok, 2 wrong, 3 ok, 4 ok, 5 wrong, 7 missing (wrong); 6 ignored. accuracy 3/6 = 50%.
    # binary (verify, logic, choose, compare): 1 ok, 2, 4 ok, 7 -> 2/4 = 50%; open (query): 3 ok, 5 -> 50%.
    assert (res["accuracy"], res["binary"], res["open"], res["n"], res["missing"]) == (50.0, 50.0, 50.0, 6, 1)
    assert res["per_structural_type"]["query"] == 50.0 and res["per_structural_type"]["choose"] == 100.0


# ------------------------------------------------------------------------------------------------------ ScienceQA
@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B. because it is", "B"), ("The answer is C.", "C"), ("I think. The answer is C!", "C"),
    ("The answer is B", "FAILED"),     # the regex needs one more character after the letter
    ("(A)", "FAILED"), ("A.", "FAILED"), ("a", "FAILED"), (" A", "FAILED"), ("A\n", "FAILED"),
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("The answer is F.", "F"),         # parsed, but no such choice -> wrong when scored
])
def test_scienceqa_q8_parse(text, expected):
    assert ev.scienceqa_parse(text) == expected


def test_scienceqa_q8_q9_scores():
    problems = {str(i): {"choices": ["x", "y", "z"], "answer": 1} for i in range(1, 8)}  # answer index 1 = "B"
    answers = (rows(("1", "B"), ("2", "A")) + rows(("3", "B"), ("4", "The answer is B"), prompt="text only")
               + rows(("5", "D"), ("6", "A"), ("6", "B. ok")))  # 5: D is beyond 3 choices; 6: the last row wins
    res = ev.score_scienceqa(answers, problems, ["1", "2", "3", "4", "5", "6", "7", "7"])
    # correct: 1, 3, 6 -> 3 of 7 split ids (7 is missing, counted once, wrong).  Image subset (prompt has
    # <image>): 1, 2, 5, 6 -> correct 1 and 6 -> 2/4.  3 and 4 have no <image>; the missing 7 is not in it.
    assert (res["correct"], res["total"], res["img_correct"], res["img_total"], res["missing"]) == (3, 7, 2, 4, 1)
    assert res["acc"] == 3 / 7 * 100 and res["img_acc"] == 50.0


def test_scienceqa_no_image_rows_defined_not_crash():
    res = ev.score_scienceqa(rows(("1", "A"), prompt="q"), {"1": {"choices": ["a", "b"], "answer": 0}}, ["1"])
    assert (res["acc"], res["img_acc"], res["img_total"]) == (100.0, 0.0, 0)  # official: ZeroDivisionError


# -------------------------------------------------------------------------------------------------------- TextVQA
@pytest.mark.parametrize("prompt, question", [
    ("What is the Brand?\nReference OCR token: coca, cola\nAnswer the question using a single word or phrase.",
     "what is the brand?"),
    ("Reference OCR token: a, b\nQuestion: What year?\nAnswer briefly.", "what year?"),
    ("Reference OCR token: a\nQuestion: Who is it?", "who is it?"),
    ("Which team?\nAnswer the question using a single word or phrase.", "which team?"),
    ("OCR tokens: a b Question: What is it? Short answer:", "what is it?"),
])
def test_textvqa_q11_question_from_prompt(prompt, question):
    assert ev.textvqa_question(prompt) == question


def test_textvqa_q11_bad_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot recover"):
        ev.textvqa_question("one line only")


@pytest.mark.parametrize("text, expected", [
    ("Coca-Cola's", "coca cola 's"),  # lower, "'s" -> " 's", '-' -> space
    ("1,000 t-shirt", "1000 t shirt"),  # commas deleted first: the digit-comma-digit rule never fires (vqaEval: tshirt)
    ("What?", "what"), ("Two", "2"), ("The End.", "end"),
])
def test_textvqa_q10_eval_ai_normalisation(text, expected):
    assert ev.eval_ai_answer(text) == expected


def test_textvqa_q10_q11_scores():
    annotations = {"data": [
        {"image_id": "img1", "question": "What Brand?", "answers": ["coca cola's"] * 3 + ["pepsi"] * 7},
        {"image_id": "img2", "question": "what number?", "answers": ["1000"] * 2 + ["100"] * 8},
        {"image_id": "img1", "question": "what color?", "answers": ["red"] * 10}]}
    p = "\nReference OCR token: x\nAnswer the question using a single word or phrase."
    answers = [{"question_id": "img1", "prompt": "What brand?" + p, "text": "Coca-Cola's"},
               {"question_id": "img2", "prompt": "What number?" + p, "text": "1,000"},
               {"question_id": "img1", "prompt": "What color?" + p, "text": "blue"}]
    # row 1: 3 matches -> 0.9; row 2: "1000", 2 matches -> 0.6; row 3: 0.  (0.9 + 0.6 + 0) / 3 = 0.5 -> 50%
    res = ev.score_textvqa(answers, annotations)
    assert res["accuracy"] == pytest.approx(50.0, abs=1e-12) and res["n"] == 3
    bad = {"data": [dict(annotations["data"][2], answers=["red"] * 9)]}
    with pytest.raises(ValueError, match="exactly 10"):
        ev.score_textvqa(answers[2:], bad)
    with pytest.raises(ValueError, match="no annotation"):
        ev.score_textvqa(answers[:1], bad)


# ----------------------------------------------------------------------------------------------------------- POPE
@pytest.mark.parametrize("text, expected", [
    ("No", "no"), ("no, there is not.", "no"), ("Yes, but it is not", "no"), ("It is not. Yes", "no"),
    ("Yes. It is not", "yes"),        # only the first sentence counts
    ("NO", "yes"), ("No!", "yes"), ("Nope", "yes"), ("", "yes"), ("no\nway", "yes"),  # single-space split
])
def test_pope_q12_parse(text, expected):
    assert ev.pope_parse(text) == expected


def test_pope_q13_q14_position_matching_and_metrics():
    questions = {10: {"category": "random"}, 11: {"category": "popular"}, 12: {"category": "random"},
                 13: {"category": "random"}, 14: {"category": "random"}}
    # random answers in file order: 12 yes, 10 no, 13 yes, 14 No!(=yes); labels by position: yes, yes, no, no.
    answers = rows((12, "Yes"), (11, "No"), (10, "No."), (13, "yes"), (14, "No!"))
    labels = {"random": [{"label": "yes"}, {"label": "yes"}, {"label": "no"}, {"label": "no"}], "popular": ["no"]}
    res = ev.score_pope(answers, labels, questions=questions)
    r = res["splits"]["random"]
    # pairs: (yes,yes) TP, (no,yes) FN, (yes,no) FP, (yes,no) FP -> TP 1, FP 2, TN 0, FN 1
    assert (r["TP"], r["FP"], r["TN"], r["FN"]) == (1, 2, 0, 1)
    assert r["accuracy"] == 0.25 and r["yes_ratio"] == 0.75
    assert r["precision"] == 1 / (3 + 1e-6) and r["recall"] == 1 / (2 + 1e-6)  # TinyLLaVA's eps
    p, q = 1 / (3 + 1e-6), 1 / (2 + 1e-6)
    assert r["f1"] == 2 * p * q / (p + q + 1e-6)
    pop = res["splits"]["popular"]  # "No" vs label no: TN 1; precision/recall/f1 = 0/(0+eps) = 0
    assert (pop["TN"], pop["accuracy"], pop["precision"], pop["recall"], pop["f1"]) == (1, 1.0, 0.0, 0.0, 0.0)
    assert res["f1_mean"] == (r["f1"] + 0.0) / 2


def test_pope_q14_zero_denominators_defined():
    # LLaVA (eps=0) divides 0 by 0 here; an empty split also breaks accuracy and yes-ratio in TinyLLaVA.
    res = ev.score_pope(rows((1, "no")), {"random": ["no"], "adversarial": []},
                        questions={1: {"category": "random"}}, eps=0.0)
    assert res["splits"]["random"]["precision"] == 0.0 and res["splits"]["random"]["f1"] == 0.0
    empty = res["splits"]["adversarial"]
    assert (empty["accuracy"], empty["yes_ratio"], empty["f1"], empty["n"]) == (0.0, 0.0, 0.0, 0)


def test_pope_category_from_row_and_count_mismatch_is_an_error():
    answers = [dict(r, category="random") for r in rows((1, "yes"), (2, "no"))]
    assert ev.score_pope(answers, {"random": ["yes", "no"]})["splits"]["random"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="2 answers but 3 labels"):
        ev.score_pope(answers, {"random": ["yes", "no", "no"]})


# ------------------------------------------------------------------------------------------------------------ MME
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("Not sure", "no"), ("None", "no"), ("know", "no"),
    ("eyes", "yes"), (" yes", "yes"), ("  yes", "other"), ("The answer is yes", "other"), ("Yeah", "other"),
    ("Nope", "no"), ("", "other"),
])
def test_mme_q15_parse(text, expected):
    assert ev.mme_parse(text) == expected


def mme_file(*pairs):
    """Task file text: one (image, gt1, pred1, gt2, pred2) tuple per image, two lines each."""
    return "".join(f"{img}\tQ1 Please answer yes or no.\t{g1}\t{p1}\n{img}\tQ2 Please answer yes or no.\t{g2}\t{p2}\n"
                   for img, g1, p1, g2, p2 in pairs)


def all_mme_tasks():
    files = {t: mme_file(("a.jpg", "Yes", "Yes", "No", "No")) for t in ev.MME_TASKS["perception"]}  # 100+100
    files |= {t: mme_file(("a.png", "Yes", "Yes", "No", "Yes")) for t in ev.MME_TASKS["cognition"]}  # 50+0
    # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2 -> 75 + 50 = 125
    files["existence"] = mme_file(("1.jpg", "Yes", "yes", "No", "no"), ("2.jpg", "Yes", "Yes", "No", "Yes"))
    return files


def test_mme_q16_acc_plus_and_sums():
    res = ev.score_mme(all_mme_tasks())
    assert res["tasks"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "other": 0, "n": 4}
    assert res["perception"] == 125.0 + 9 * 200.0   # = 1925
    assert res["cognition"] == 4 * 50.0             # acc 1/2, acc+ 0 -> 50 each
    assert res["errors"] == []


def test_mme_q16_pairs_are_consecutive_lines():
    files = all_mme_tasks()
    # lines: (img1: right, wrong), (img2: right, right) -> acc 3/4, acc+ 1/2: pairing is by consecutive lines.
    files["count"] = mme_file(("1.jpg", "Yes", "Yes", "No", "Yes"), ("2.jpg", "No", "No", "Yes", "Yes"))
    assert ev.score_mme(files)["tasks"]["count"]["score"] == 125.0


def test_mme_q17_all_other_task_scores_zero():
    files = all_mme_tasks()
    files["OCR"] = mme_file(("o.jpg", "Yes", "Maybe", "No", "I think so"))  # both 'other': acc 0, acc+ 0
    res = ev.score_mme(files)
    assert res["tasks"]["OCR"] == {"acc": 0.0, "acc_plus": 0.0, "score": 0.0, "other": 2, "n": 2}
    assert res["perception"] == 125.0 + 8 * 200.0


def test_mme_q17_missing_task_is_a_clear_error():
    files = all_mme_tasks()
    del files["code_reasoning"]
    with pytest.raises(ev.MMEFormatError, match="code_reasoning: task file missing"):
        ev.score_mme(files)
    res = ev.score_mme(files, strict=False)  # perception still complete, cognition is not
    assert res["perception"] == 1925.0 and res["cognition"] is None
    assert res["errors"] == ["code_reasoning: task file missing"]


def test_mme_q17_odd_lines_tab_and_newline_in_prediction():
    files = all_mme_tasks()
    files["color"] = files["color"] + "b.jpg\tQ?\tYes\tYes\n"                      # 3 lines
    files["posters"] = mme_file(("p.jpg", "Yes", "Yes\tsure", "No", "No"))           # tab inside a prediction
    files["scene"] = mme_file(("s.jpg", "Yes", "Yes\nindeed", "No", "No"))           # newline inside a prediction
    files["artwork"] = mme_file(("x.jpg", "Yes", "Yes", "No", "No"), ("y.jpg", "Yes", "Yes", "Maybe", "No"))
    with pytest.raises(ev.MMEFormatError) as info:
        ev.score_mme(files)
    msg = str(info.value)
    assert "color: 3 lines" in msg
    assert "posters line 1: 5 tab-separated fields, expected 4" in msg
    assert "scene line 2: 1 tab-separated fields" in msg and "scene: 3 lines" in msg
    assert "artwork line 4: ground truth 'Maybe' is not yes/no" in msg


def test_mme_q17_mismatched_pair_and_list_of_lines_input():
    files = all_mme_tasks()
    files["landmark"] = ["a.jpg\tQ\tYes\tYes\n", "b.jpg\tQ\tNo\tNo\n"]  # a list of lines works too
    res = ev.score_mme(files, strict=False)
    assert res["errors"] == ["landmark lines 1-2: a pair must share its image ('a.jpg' != 'b.jpg')"]
    assert res["perception"] is None and res["cognition"] == 200.0


# ----------------------------------------------------------------------------------------------------------- MMMU
CHOICES, OPTIONS = ["A", "B", "C", "D"], {"A": "dog", "B": "cat", "C": "fox", "D": "fox den"}


def parse(text, qid="validation_Art_1"):
    return ev.mmmu_parse_choice(text, CHOICES, OPTIONS, ev.mmmu_rng(qid))


@pytest.mark.parametrize("text, expected", [
    ("(B)", "B"), ("The answer is (C).", "C"),
    ("B", "B"), ("B.", "B"), ("I pick B here", "B"),   # ' X ' after stripping punctuation at the ends
    ("(A) is wrong, (C) is right", "C"),             # several: the last mention wins
    ("C or A", "A"),                                 # ...also for bare letters
    ("(D) beats C", "D"),                            # brackets first: the bare C is not looked at
    ("It is quite clearly a cat", "B"),              # > 5 words: option text
    ("I am fairly sure it is the fox den", "C"),     # "fox" and "fox den" end at the same place: a tie -> first
])
def test_mmmu_q18_parse_choice(text, expected):
    assert parse(text) == expected


def test_mmmu_q18_fallback_is_deterministic_per_question():
    # No candidate: "cat" (<= 5 words), lowercase "b", "B,." (strip(',') then strip('.') leaves "B,").
    expected = random.Random("42:validation_Art_1").choice(CHOICES)  # the documented rule
    assert expected == "D"  # pinned: what that rule gives for this id
    for text in ("cat", "b", "B,.", ""):
        assert parse(text) == expected
    # Another id may get another letter, but always the same one for that id.
    assert parse("", "validation_Art_2") == random.Random("42:validation_Art_2").choice(CHOICES)


@pytest.mark.parametrize("response, gold, correct", [
    ("The answer is 5", "5", True),                  # tails: "5" (after 'is '), "is 5" (after 'answer ') -> "5"
    ("It is 7. So the answer is 8", "7", False),     # one line (no sentence split after lower()): only "8"
    ("It is 7\nSo the answer is 8", "7", True),      # a newline splits: "7" and "8"
    ("The result is 3.14159", "3.14", True),         # numbers rounded to 2 decimals
    ("x = 1,234", "1234", True),                     # comma number -> 1234.0
    ("The capital is Paris, France", "paris", True),  # text gold: substring of a candidate
    ("banana", "a", False),                          # 1-char gold becomes " a" / "a ": no trivial match
    ("Thus 6", ["6", "six"], True),                  # list of golds
])
def test_mmmu_q19_q20_open(response, gold, correct):
    assert ev.mmmu_open_correct(gold, ev.mmmu_parse_open(response)) is correct


def test_mmmu_q20_q21_scores():
    answer_dict = {"validation_Art_1": {"question_type": "multiple-choice", "ground_truth": "B"},
                   "validation_Art_2": {"question_type": "multiple-choice", "ground_truth": "A"},
                   "validation_Math_1": {"question_type": "short-answer", "ground_truth": "12"},
                   "validation_Math_2": {"question_type": "short-answer", "ground_truth": "3"},  # no prediction
                   "validation_Music_1": {"question_type": "multiple-choice", "ground_truth": "C"}}
    questions = [{"id": k, "all_choices": CHOICES, "index2ans": OPTIONS} for k in answer_dict]
    answers = rows(("validation_Art_1", "(B)"), ("validation_Art_2", "b"), ("validation_Math_1", "so 12"),
                   ("validation_Music_1", "C"), ("validation_Physics_9", "A"))
    res = ev.score_mmmu(answers, answer_dict, questions=questions)
    # Art_1 right; Art_2 "b" -> no candidate -> fallback Random("42:validation_Art_2") gives "C": wrong;
    # Math_1 "so 12" -> 12.0 right; Music_1 right.
    assert ev.mmmu_rng("validation_Art_2").choice(CHOICES) == "C"
    assert res["subjects"] == {"Art": {"num": 2, "acc": 0.5}, "Math": {"num": 1, "acc": 1.0},
                               "Music": {"num": 1, "acc": 1.0}}
    # Art and Design = (0.5*2 + 1.0*1) / 3 = 2/3, kept unrounded (MMMU prints 0.667; a results file keeps all);
    # Science = 1.0 (Math_2 has no prediction: not counted); overall = (0.5*2 + 1*1 + 1*1) / 4 = 0.75.
    # Physics_9 is not in answer_dict.
    assert res["domains"]["Art and Design"] == {"num": 3, "acc": 2 / 3}
    assert res["domains"]["Science"] == {"num": 1, "acc": 1.0}
    assert res["domains"]["Business"] == {"num": 0, "acc": 0.0}
    assert res["overall"] == {"num": 4, "acc": 0.75} and res["unknown_ids"] == ["validation_Physics_9"]
    # Without questions, multiple-choice text is taken as already parsed: "(B)" != "B" -> Art 0 / 2.
    assert ev.score_mmmu(answers, answer_dict)["subjects"]["Art"] == {"num": 2, "acc": 0.0}


def test_mmmu_q21_multi_image_questions():
    mc = {"id": "validation_Art_3", "question_type": "multiple-choice", "all_choices": CHOICES}
    assert mmmu_multi_image_answer(mc) == random.Random("42:validation_Art_3").choice(CHOICES)
    assert mmmu_multi_image_answer({"id": "x", "question_type": "open"}) == MMMU_MULTI_IMAGE_OPEN
    # The placeholder row is then scored like any other: an open INVALID answer is wrong.
    res = ev.score_mmmu(rows(("validation_Math_1", MMMU_MULTI_IMAGE_OPEN)),
                        {"validation_Math_1": {"question_type": "open", "ground_truth": "12"}})
    assert res["overall"] == {"num": 1, "acc": 0.0}


# --------------------------------------------------------------------------------------------------------- MM-Vet
def test_mmvet_q23_submission():
    assert mmvet_submission(rows((0, "a cat"), (7, "42"))) == {"v1_0": "a cat", "v1_7": "42"}


def test_mmvet_q22_prompt():
    prompt = ev.mmvet_grader_prompt("What is x?", "-1<AND>-5<OR>2", "x = 3")
    assert prompt.startswith("Compare the ground truth and prediction from AI models")
    # The table ends "| 1.0\n", then "\n" + the new row with an empty last cell.
    assert prompt.endswith("physical characteristics. | 1.0\n\nWhat is x? | -1 <AND> -5 <OR> 2 | x = 3 | ")
    assert prompt.count("\n") == 12  # 1 blank after the instructions, header, rule, 7 examples, blank, query
    retry = ev.mmvet_grader_prompt("q", "a", "p", retry=True)
    assert retry.endswith("q | a | p | \nPredict the correctness of the answer (digit): ")


@pytest.mark.parametrize("reply, score", [
    ("0.7", 0.7), ("0.7 because", 0.7), ("1.0\n", 1.0), ("0", 0.0),
    (" 0.7", None),                   # first space-separated token is ''
    ("1.5", None), ("-0.1", None), ("abc", None), ("0.5.", None), ("nan", None), (None, None),
])
def test_mmvet_q22_parse(reply, score):
    assert ev.mmvet_parse_grade(reply) == score


def fake_judge(replies):
    calls = []

    def ask(prompt, temperature):
        calls.append((temperature, prompt.endswith("(digit): ")))
        return replies[len(calls) - 1]
    return ask, calls


def test_mmvet_q22_retry_schedule():
    ask, calls = fake_judge(["0.4"])
    assert ev.mmvet_grade(ask, "q", "a", "p") == (0.4, ["0.4"]) and calls == [(0.0, False)]
    ask, calls = fake_judge(["?", "x", "x", "x", "0.7"])  # 5th call (temperature 1.5) parses
    assert ev.mmvet_grade(ask, "q", "a", "p")[0] == 0.7
    assert calls == [(0.0, False), (0.0, True), (0.5, True), (1.0, True), (1.5, True)]
    ask, calls = fake_judge(["x"] * 5 + ["1.0"])  # the 6th reply (temperature 2.0) is never parsed: 0.0
    assert ev.mmvet_grade(ask, "q", "a", "p")[0] == 0.0
    assert [t for t, _ in calls] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]


def test_mmvet_q23_capability_scores():
    meta = {"v1_0": {"question": "q0", "answer": "a", "capability": ["rec", "ocr"]},
            "v1_1": {"question": "q1", "answer": "b", "capability": ["ocr"]},
            "v1_2": {"question": "q2", "answer": "c", "capability": ["rec", "know", "rec"]}}
    ask, _ = fake_judge(["1.0", "0.5", "0.0"])
    preds = {"v1_0": "a", "v1_1": "b", "v1_2": "z"}
    grades = {k: [ev.mmvet_grade(ask, m["question"], m["answer"], preds[k])[0]] for k, m in meta.items()}
    assert grades == {"v1_0": [1.0], "v1_1": [0.5], "v1_2": [0.0]}
    res = ev.mmvet_scores(grades, meta)
    # rec: (1.0 + 0.0) / 2 * 100 = 50.0; ocr: (1.0 + 0.5) / 2 * 100 = 75.0; know: 0 / 1 = 0.0;
    # total: 1.5 / 3 * 100 = 50.0. ("rec" listed twice counts once.)
    assert res["capabilities"] == {"rec": 50.0, "ocr": 75.0, "know": 0.0}
    assert (res["total"], res["std"], res["runs"]) == (50.0, 0.0, [50.0])
    assert res["integrations"] == {"ocr_rec": 100.0, "ocr": 50.0, "know_rec": 0.0}
    # 2 runs, only v1_0 graded (1.0, then 0.5); ungraded items still count in the denominators:
    # rec = ocr: per run 1.0/2*100 = 50 and 0.5/2*100 = 25 -> mean 37.5; know: 0.
    # total: per run 1.0/3*100 = 33.33 and 0.5/3*100 = 16.67 -> mean 25.0, runs [33.3, 16.7],
    # population std = |33.33 - 25| = 8.33 -> 8.3.
    res = ev.mmvet_scores({"v1_0": [1.0, 0.5]}, {k: v["capability"] for k, v in meta.items()})
    assert res["capabilities"] == {"rec": 37.5, "ocr": 37.5, "know": 0.0}
    assert (res["total"], res["std"], res["runs"]) == (25.0, 8.3, [33.3, 16.7])


def test_mmvet_q23_rounding_is_numpys():
    # numpy rounds 0.15 * 10 = 1.5 -> 2 (half even on the scaled value); Python's round(0.15, 1) gives 0.1.
    assert ev._np_round(0.15, 1) == 0.2 and ev._np_round(0.35, 1) == 0.4 and ev._np_round(2.675, 2) == 2.68
    assert ev._np_round(0.25, 1) == 0.2  # exact half: to even

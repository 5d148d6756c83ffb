"""What evaluate.py may trust (issue #13): the MM-Vet judge gets the key only at the https URL given (no redirect
is followed), each answer is graded once across re-runs; answers are reused only with the settings that made
them; --limit is a count; a subset is scored against its own questions' ground truth and says so."""
import contextlib
import glob
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import evaluate
from test_evaluate import dump, image, run, setup  # noqa: F401 (setup: the tiny model and benchmark fixtures)


@contextlib.contextmanager
def serve(reply):
    """A local HTTP server on 127.0.0.1; reply(handler) answers every request. It stops itself after 30 s even if
    the test hangs, and in any case when the block ends."""
    class Handler(BaseHTTPRequestHandler):
        do_GET = do_POST = reply

        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    stop = threading.Timer(30, server.shutdown)
    stop.start()
    try:
        yield server
    finally:
        stop.cancel()
        server.shutdown()
        server.server_close()


def send(handler, code, body=b"", **headers):
    handler.send_response(code)
    for k, v in {"Content-Length": str(len(body)), **headers}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def test_the_judge_never_follows_a_redirect_with_the_key():
    seen = []   # (method, Authorization) of every request reaching the other host

    def other(h):
        seen.append((h.command, h.headers.get("Authorization")))
        send(h, 200, json.dumps({"choices": [{"message": {"content": "1.0"}}]}).encode())
    with serve(other) as b:
        target = f"http://127.0.0.1:{b.server_port}/steal"
        with serve(lambda h: send(h, 302, Location=target)) as a:
            ask = evaluate.openai_compatible_ask(f"http://127.0.0.1:{a.server_port}/v1", "m", "secret",
                                                   timeout=5, allow_http=True)
            with pytest.raises(evaluate.JudgeError, match=f"302 redirect to {target}; not followed"):
                ask("grade this", 0.0)
    assert seen == []   # the key never left for the Location, nor did anything else
    with serve(lambda h: send(h, 401)) as c:   # an HTTP error is one line, not a traceback through urllib
        with pytest.raises(evaluate.JudgeError, match="answered HTTP 401"):
            evaluate.openai_compatible_ask(f"http://127.0.0.1:{c.server_port}/v1", "m", allow_http=True)("x", 0.0)
    with pytest.raises(evaluate.JudgeError, match="not reachable"):   # that port is closed now
        evaluate.openai_compatible_ask(target, "m", allow_http=True, timeout=5)("x", 0.0)


def test_a_plain_http_judge_needs_the_flag(setup, tmp_path, capsys):
    for url in ("http://127.0.0.1:9/v1", "file:///etc/passwd", "127.0.0.1:9/v1"):
        with pytest.raises(ValueError, match="only https://"):
            evaluate.openai_compatible_ask(url, "m", allow_http=url.startswith("file"))
    model, data, _ = setup
    with pytest.raises(SystemExit):   # refused before the model loads
        run(model, data, str(tmp_path), "--bench", "mmvet", "--judge-url", "http://127.0.0.1:9/v1")
    assert "--judge-url" in capsys.readouterr().err


def counting_judge(monkeypatch):
    """Replaces the judge client: every call is recorded, the grades go 0.1, 0.2, ... in the order asked."""
    calls = []

    def client(url, model, key=None, **kwargs):
        def ask(prompt, temperature):
            calls.append(prompt.split("\n")[-1])
            return f"{len(calls) / 10:.1f}"
        return ask
    monkeypatch.setattr(evaluate, "openai_compatible_ask", client)
    return calls


def judge_run(model, data, out, *extra):
    return run(model, data, out, "--bench", "mmvet", "--judge-url", "https://judge.example/v1", *extra)[0]


def test_each_answer_is_graded_once_across_runs(setup, tmp_path, monkeypatch):
    model, data, _ = setup
    calls = counting_judge(monkeypatch)
    first = judge_run(model, data, str(tmp_path))
    again = judge_run(model, data, str(tmp_path))
    assert len(calls) == 2 and again["headline"] == first["headline"] == {"total": 15.0}   # (0.1 + 0.2) / 2
    rows = evaluate.read_json(str(tmp_path / "mmvet_answers.jsonl"))   # a changed answer is graded anew
    rows[1]["text"] += " (edited)"
    dump(str(tmp_path / "mmvet_answers.jsonl"), rows, lines=True)
    assert judge_run(model, data, str(tmp_path))["headline"] == {"total": 20.0} and len(calls) == 3


def test_a_limit_rerun_adds_grades_and_keeps_the_earlier(setup, tmp_path, monkeypatch):
    model, _, _ = setup
    data = str(tmp_path / "data")
    qs = [{"question_id": i, "image": f"v1_{i}.png", "text": f"What is {i}+{i}?"} for i in range(4)]
    dump(f"{data}/mm-vet/llava-mm-vet.jsonl", qs, lines=True)
    dump(f"{data}/mm-vet/mm-vet.json", {f"v1_{i}": {"question": q["text"], "answer": str(2 * i), "capability": ["math"]}
                                        for i, q in enumerate(qs)})
    for q in qs:
        image(f"{data}/mm-vet/images/{q['image']}")
    calls, out = counting_judge(monkeypatch), str(tmp_path / "out")
    assert judge_run(model, data, out, "--limit", "2")["metrics"]["runs"] == [15.0]   # 0.1, 0.2
    four = judge_run(model, data, out, "--limit", "4")
    assert len(calls) == 4 and four["metrics"]["runs"] == [25.0]   # 0.1, 0.2 kept; 0.3, 0.4 new
    assert judge_run(model, data, out, "--limit", "2")["metrics"]["runs"] == [15.0] and len(calls) == 4
    assert len(evaluate.read_json(f"{out}/mmvet_grades.json")) == 4   # the shorter run dropped none


def ids(out, bench="pope"):
    return [r["answer_id"] for r in evaluate.read_json(os.path.join(out, f"{bench}_answers.jsonl"))]


def test_answers_are_reused_only_with_the_settings_that_made_them(setup, tmp_path, capsys):
    model, data, _ = setup
    out = str(tmp_path)
    run(model, data, out, "--bench", "pope")
    made = ids(out)
    assert run(model, data, out, "--bench", "pope", "--batch-size", "1") and ids(out) == made   # not a setting
    for option, value, said in [("--max-new-tokens", "3", "max_new_tokens 5 -> 3"),
                                ("--template", "phi", "template 'llama' -> 'phi'"),
                                ("--num-beams", "2", "num_beams 1 -> 2")]:
        capsys.readouterr()
        res = run(model, data, out, "--bench", "pope", option, value)[0]
        assert set(ids(out)).isdisjoint(made), f"{option} {value}: the earlier answers were reused"
        assert said in capsys.readouterr().out and str(res["answer_settings"][said.split()[0]]) == value
        made = ids(out)
    assert len(glob.glob(f"{out}/pope_answers.jsonl.*.old")) == 3   # every earlier file is kept aside
    # an answer file without a settings file (an older evaluate.py, another tool) is not trusted either
    os.remove(f"{out}/pope_answers.settings.json")
    run(model, data, out, "--bench", "pope")
    assert set(ids(out)).isdisjoint(made) and "no settings file" in capsys.readouterr().out
    # --keep-answers keeps them whatever made them, and records that; a plain run then sets the mix aside
    made = ids(out)
    res = run(model, data, out, "--bench", "pope", "--max-new-tokens", "4", "--keep-answers")[0]
    assert ids(out) == made and res["answer_settings"]["earlier_answers"]["max_new_tokens"] == 5
    run(model, data, out, "--bench", "pope", "--max-new-tokens", "4")
    assert set(ids(out)).isdisjoint(made) and "kept by --keep-answers" in capsys.readouterr().out


def test_answers_of_changed_weights_are_not_reused(setup, tmp_path):
    model, data, _ = setup
    copy, out = str(tmp_path / "model"), str(tmp_path / "out")
    shutil.copytree(model, copy)
    run(copy, data, out, "--bench", "pope")
    made = ids(out)
    st = os.stat(f"{copy}/model.safetensors")   # retrained in place: same path, a new file
    os.utime(f"{copy}/model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    run(copy, data, out, "--bench", "pope")
    assert set(ids(out)).isdisjoint(made)


def test_limit_is_a_count_of_questions(setup, tmp_path):
    model, data, _ = setup
    for bad in ("0", "-1"):   # 0 meant all, -1 all but the last
        with pytest.raises(SystemExit):
            run(model, data, str(tmp_path), "--bench", "pope", "--limit", bad)


def fake_answers(monkeypatch, texts):
    """Answers without a model: {question_id: text}."""
    monkeypatch.setattr(evaluate, "answer", lambda model, tok, proc, items, *args, **kwargs: [
        {"question_id": it["question_id"], "prompt": it["prompt"], "text": texts[it["question_id"]]} for it in items])


def test_a_questions_subset_is_scored_against_its_own_ground_truth(setup, tmp_path, monkeypatch, capsys):
    model, data, _ = setup
    fake_answers(monkeypatch, {1: "2", 3: "dog", "11": "B"})
    qs = [q for q in evaluate.read_json(f"{data}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl") if q["question_id"] != 2]
    dump(str(tmp_path / "two.jsonl"), qs, lines=True)
    vqa = run(model, f"{data}/vqav2", str(tmp_path), "--bench", "vqav2", "--questions", str(tmp_path / "two.jsonl"))
    assert vqa[0]["headline"]["accuracy"] == 100.0 and (vqa[0]["scored"], vqa[0]["of"]) == (2, 3)
    assert "(2 of 3 questions)" in capsys.readouterr().out   # and the note on how a subset is scored
    sqa = evaluate.read_json(f"{data}/scienceqa/llava_test_CQM-A.json")[:1]
    dump(str(tmp_path / "one.json"), sqa)
    res = run(model, data, str(tmp_path), "--bench", "scienceqa", "--questions", str(tmp_path / "one.json"))[0]
    assert res["headline"] == {"img_acc": 100.0, "acc": 100.0} and res["metrics"]["missing"] == 0
    assert evaluate.SUBSET_NOTE in capsys.readouterr().out


def test_trust_remote_code_is_passed_to_the_loader(setup, tmp_path, monkeypatch):
    import model as model_py
    model, data, _ = setup
    seen = []

    def load(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop here")
    monkeypatch.setattr(model_py, "load_pretrained", load)
    for extra in ([], ["--trust-remote-code"]):
        with pytest.raises(RuntimeError, match="stop here"):
            run(model, data, str(tmp_path), "--bench", "pope", *extra)
    assert seen == [False, True]

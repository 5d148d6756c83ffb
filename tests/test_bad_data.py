"""Nothing a user feeds it crashes it: a data set with one record of every kind of problem a user has met (images
that are missing, truncated, bombs, directories, outside the image folder; text that cannot be encoded; duplicate
ids; a conversation that starts with the assistant; malformed JSONL lines) and awkward-but-valid images (grayscale,
CMYK, RGBA, palette, 16-bit, 1x1, 4000x10, a PNG named .jpg, a non-ASCII name). The check must report every bad
record with its code and no good one; bad_samples="skip" must leave out exactly the bad ones, log each as it is met
and still make batches; "error" must stop with one line naming the record and the code."""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers import SiglipImageProcessor

import check_data
import data
import records as records_py
from data import DataError, VLMDataset, collate, preprocess_image
from tiny_tokenizers import make_tokenizer

N_IMG, MAX_LEN = 4, 64
Q = "What is in the picture?"


def conv(*values, first="human"):
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


def png_header_only(path, w, h):
    """A PNG that declares w x h and holds a few rows of pixels: a decompression bomb is a few hundred bytes."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1) * 4)) + chunk(b"IEND", b""))


def truncated(path, fmt, keep=0.6):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, fmt)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[:int(len(buf.getvalue()) * keep)])


AWKWARD = {   # file name -> how to make it: all valid, none may be reported
    "gray.png": lambda p: Image.new("L", (20, 12), 128).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (16, 16), (0, 128, 0, 0)).save(p),
    "rgba.png": lambda p: Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(p),
    "palette.png": lambda p: Image.new("P", (16, 16), 3).save(p, transparency=0),
    "sixteen_bit.png": lambda p: Image.new("I;16", (8, 8), 3000).save(p),
    "one.png": lambda p: Image.new("RGB", (1, 1), (9, 9, 9)).save(p),
    "wide.png": lambda p: Image.new("RGB", (4000, 10), (0, 0, 255)).save(p),
    "png_named.jpg": lambda p: Image.new("RGB", (16, 16), (0, 255, 0)).save(p, format="PNG"),
    "café 日本.png": lambda p: Image.new("RGB", (16, 16), (1, 2, 3)).save(p),
}


def bad_dataset(root):
    """(jsonl path, image folder, {index: code} of the bad records, indices of the good ones)."""
    images = os.path.join(root, "images")
    os.makedirs(os.path.join(images, "a_directory"), exist_ok=True)
    os.makedirs(os.path.join(images, "sub"), exist_ok=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(os.path.join(images, "ok.png"))
    Image.new("RGB", (16, 16)).save(os.path.join(root, "outside.png"))
    for name, make in AWKWARD.items():
        make(os.path.join(images, name))
    with open(os.path.join(images, "junk.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    open(os.path.join(images, "empty.jpg"), "wb").close()
    truncated(os.path.join(images, "cut.png"), "PNG")
    truncated(os.path.join(images, "cut.jpg"), "JPEG")
    png_header_only(os.path.join(images, "bomb.png"), 30000, 30000)     # over PIL's own limit
    png_header_only(os.path.join(images, "big.png"), 10000, 10000)      # over images.MAX_IMAGE_PIXELS only

    ok = conv(f"<image>\n{Q}", "A cat.")
    lines, bad, good = [], {}, []

    def add(record, code=None):   # a record (or a raw line) and the code it must be reported with, if bad
        if code:
            bad[len(lines)] = code
        else:
            good.append(len(lines))
        lines.append(record if isinstance(record, str) else json.dumps(record))  # ensure_ascii: "\ud800" escaped
    add({"id": "good", "image": "ok.png", "conversations": ok})
    for name in AWKWARD:
        add({"id": f"awkward {name}", "image": name, "conversations": ok})
    add({"id": "inside-through-dotdot", "image": "sub/../ok.png", "conversations": ok})
    add({"id": "text", "conversations": conv("Café ☕ 日本?", "Oui.")})
    add({"id": 7, "conversations": conv("Why?", "Because.")})
    add({"id": "7", "conversations": conv("Why?", "Because.")})                    # 7 and "7" differ
    add({"id": "system-first", "conversations": [{"from": "system", "value": "Be brief."}] + conv("Hi?", "Yes.")})
    for name, code in [("nope.png", "image-missing"), ("junk.png", "image-unreadable"),
                       ("empty.jpg", "image-unreadable"), ("cut.png", "image-truncated"),
                       ("cut.jpg", "image-truncated"), ("bomb.png", "image-too-large"),
                       ("big.png", "image-too-large"), ("a_directory", "image-not-a-file"),
                       ("ok.png/nope.png", "image-missing"), ("../outside.png", "image-outside"),
                       (os.path.join(root, "outside.png"), "image-outside"),
                       ("sub/../../outside.png", "image-outside")]:
        add({"id": f"bad {name}", "image": name, "conversations": ok}, code)
    add({"id": "surrogate", "conversations": conv("Why?", "Because \ud800.")}, "text-unencodable")
    add('{"id": "not-utf8", "conversations": [{"from": "human", "value": "Why \xff?"}, '
        '{"from": "gpt", "value": "No."}]}', "text-unencodable")                  # "\xff": a raw byte, below
    add({"id": "good", "conversations": conv("Why?", "Because.")}, "duplicate-id")
    add({"id": "gpt-first", "conversations": conv("Hello.", Q, "A cat.", first="gpt")}, "starts-with-assistant")
    add('{"id": "cut-line", "conversations": [', "bad-jsonl-line")
    add("not json at all", "bad-jsonl-line")
    add({"id": "too-long", "image": "ok.png", "conversations": conv("<image>\n" + " ".join([Q] * 40), "A cat.")},
        "answer-truncated")
    add({"id": "after-the-bad-lines", "image": "ok.png", "conversations": ok})
    path = os.path.join(root, "data.jsonl")
    text = "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n"   # an empty line: line numbers != indices
    with open(path, "wb") as f:
        f.write(text.encode().replace("\xff".encode(), b"\xff"))   # the one raw byte that is not UTF-8
    return path, images, bad, good


READ_TIME = {"image-missing", "image-unreadable", "image-truncated", "image-too-large", "image-not-a-file",
             "answer-truncated"}
TRAINED_ON = {"duplicate-id"}   # reported by the check, not a bad sample (ids only name records)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer("llama", tmp_path_factory.mktemp("tok"))


def dataset(path, images, tok, policy="skip", **kw):
    proc = SiglipImageProcessor(size={"height": 16, "width": 16})
    return VLMDataset(path, tok, proc, "llama", N_IMG, MAX_LEN, images, bad_samples=policy, **kw)


def test_the_data_set_is_what_it_says(tmp_path):
    path, images, bad, good = bad_dataset(tmp_path)
    assert os.path.getsize(os.path.join(images, "bomb.png")) < 1000
    text = open(path, "rb").read()
    assert b"\xff" in text and b"\\ud800" in text and b"\n\n" in text   # a raw non-UTF-8 byte, an escape, a gap
    assert len(data.read_records(path)) == len(bad) + len(good)


def test_the_check_reports_every_bad_record_and_no_good_one(tok, tmp_path):
    path, images, bad, good = bad_dataset(tmp_path)
    report = check_data.check(data.read_records(path), images, tok, "llama", N_IMG, MAX_LEN)
    found = {}
    for i, _, code, _ in report["problems"]:
        found.setdefault(i, []).append(code)
    assert found == {i: [code] for i, code in bad.items()}     # recall and precision, with the code
    assert [n[1] for n in report["notes"]] == ["system-first"]
    # every record training keeps that tokenises: the good ones, the repeated id (trained on), answer-truncated
    assert len(report["lengths"]) == len(good) + 2


def test_the_check_prints_each_problem_with_index_id_and_code(tok, tmp_path, capsys):
    path, images, bad, good = bad_dataset(tmp_path)
    tok.save_pretrained(tmp_path / "tok")
    status = check_data.main([path, "--image-folder", images, "--tokenizer", str(tmp_path / "tok"), "--template",
                              "llama", "--num-image-tokens", str(N_IMG), "--max-length", str(MAX_LEN), "--show=-1"])
    out = capsys.readouterr().out
    assert status == 1
    records = data.read_records(path)
    for i, code in bad.items():
        where = f"{path}: record {i} " + ("(line " if isinstance(records[i], data.BadLine) else
                                            f"(id={records[i]['id']!r}): ")
        assert where in out and out.split(where)[1].splitlines()[0].endswith(f"[{code}]"), (i, out)
    assert f"{len(bad)} with problems" in out and "      3  image-outside" in out
    n = max(i for i, c in bad.items() if c == "bad-jsonl-line")   # the file has an empty line after record 2
    assert f"{path}: record {n} (line {n + 2}): bad JSON line: Expecting value [bad-jsonl-line]" in out
    assert "a lone surrogate" in out


def test_skip_leaves_out_exactly_the_bad_records_logs_each_as_met_and_batches(tok, tmp_path):
    path, images, bad, good = bad_dataset(tmp_path)
    log = tmp_path / "run" / "skipped.rank0.jsonl"
    ds = dataset(path, images, tok, skip_log=str(log))
    at_load = {i: c for i, c in bad.items() if c not in READ_TIME | TRAINED_ON}
    assert {i for i, _, _ in ds.skipped} == set(at_load)
    assert {r["index"]: r["code"] for r in data.read_skip_log(log)} == at_load     # written before anything is read
    assert len(ds) == len(bad) + len(good) - len(at_load)
    first_bad = ds.origin.index(min(i for i in bad if i not in at_load))
    ds[first_bad]
    assert min(i for i in bad if i not in at_load) in {r["index"] for r in data.read_skip_log(log)}   # at once
    batch = collate([ds[i] for i in range(len(ds))], tok.unk_token_id)
    assert {i for i, c in bad.items() if c in READ_TIME} == {i for i, _, _ in batch["skipped"]}
    assert batch["input_ids"].shape[0] == len(ds)
    assert batch["images"].shape[0] == int((batch["input_ids"] == -200).any(1).sum())
    rows = data.read_skip_log(log, tmp_path / "no-such-file.jsonl")
    assert {r["index"]: r["code"] for r in rows} == {i: c for i, c in bad.items() if c not in TRAINED_ON}   # once each
    assert {r["when"] for r in rows if r["code"] in READ_TIME} == {"read"}
    assert all(f"[{r['code']}]" in r["problem"] and r["problem"].startswith(f"{path}: record {r['index']} ")
               for r in rows)
    with open(log, "a") as f:
        f.write('{"index": 99, "id": "torn by a cra')                     # a crash mid-line
    assert data.read_skip_log(log) == rows


def test_error_stops_at_each_bad_record_with_one_line_naming_it_and_the_code(tok, tmp_path, capsys):
    path, images, bad, good = bad_dataset(tmp_path)
    records = data.read_records(path)
    first = min(i for i, c in bad.items() if c not in READ_TIME)
    with pytest.raises(DataError, match=rf"data.jsonl: record {first} \(id='bad ../outside.png'\): image path "
                                        r"'../outside.png' leaves the image folder .*\[image-outside\]$"):
        dataset(path, images, tok, "error")
    dup = next(i for i, c in bad.items() if c == "duplicate-id")   # reported by the check, trained on
    assert len(dataset([records[0], records[dup]], images, tok, "error")) == 2
    assert "<records>: 1 records reuse an earlier id (first: record 1) [duplicate-id]" in capsys.readouterr().out
    for i, code in bad.items():
        if code == "duplicate-id":
            continue
        with pytest.raises(DataError) as e:
            dataset([records[i]], images, tok, "error")[0]
        assert e.value.code == code and str(e.value).startswith("<records>: record 0 (") and "\n" not in str(e.value)
        assert str(e.value).endswith(f"[{code}]"), str(e.value)
    ds = dataset([records[i] for i in good], images, tok, "error")
    assert collate([ds[i] for i in range(len(ds))], tok.unk_token_id)["images"].shape[0] == len(AWKWARD) + 3


def test_outside_images_are_allowed_when_asked(tok, tmp_path, capsys):
    path, images, bad, good = bad_dataset(tmp_path)
    outside = [i for i, c in bad.items() if c == "image-outside"]
    ds = dataset(path, images, tok, allow_outside_images=True)
    assert not set(outside) & {i for i, _, _ in ds.skipped}
    assert all(ds[ds.origin.index(i)]["id"].startswith("bad ") for i in outside)   # read, not replaced
    report = check_data.check(data.read_records(path), images, allow_outside_images=True)
    assert not set(outside) & {i for i, _, _, _ in report["problems"]}
    assert check_data.main([path, "--allow-outside-images"]) == 1
    assert "image-outside" not in capsys.readouterr().out


def test_file_level_problems(tmp_path, capsys):
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": [{"id": 1, "conversations": conv("Hi?", "Yes.")}]}, indent=1))
    with pytest.raises(DataError, match="wrapped.json: the top level must be a list of records") as e:
        data.read_records(p)
    assert e.value.code == "bad-top-level"
    p.write_text(json.dumps({"data": []}))                                 # one line: not a one-record JSONL
    with pytest.raises(DataError, match="the top level must be a list of records"):
        data.read_records(p)
    assert check_data.main([str(p)]) == 1
    assert "error: " in capsys.readouterr().err
    one = {"id": 1, "conversations": conv("Hi?", "Yes.")}
    p.write_text(json.dumps(one) + "\n")                                   # a one-record JSONL file is fine
    assert data.read_records(p) == [one]
    p.write_text("\ufeff" + json.dumps([one]))                             # a byte-order mark
    assert data.read_records(p) == [one]


def test_a_truncated_image_is_refused_whatever_pil_is_told(tmp_path):
    truncated(tmp_path / "cut.jpg", "JPEG")
    ImageFile.LOAD_TRUNCATED_IMAGES = True                                 # as LLaVA's own code sets it
    try:
        with pytest.raises(DataError, match="cut.jpg: image file is truncated") as e:
            data.load_image(tmp_path / "cut.jpg")
        assert e.value.code == "image-truncated" and ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_one_record_that_breaks_the_code_is_an_internal_error_not_a_crash(tok, tmp_path, monkeypatch, capsys):
    path, images, bad, good = bad_dataset(tmp_path)
    real = data.encode

    def encode(conversations, *a, **k):
        if conversations[0]["value"] == "Café ☕ 日本?":
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real(conversations, *a, **k)
    monkeypatch.setattr(data, "encode", encode)
    records = data.read_records(path)
    text = next(i for i in good if records[i]["id"] == "text")
    report = check_data.check(records, images, tok, "llama", N_IMG, MAX_LEN)
    problems = {i: c for i, _, c, _ in report["problems"]}
    assert problems == {**bad, text: "internal-error"}
    ds = dataset(path, images, tok)
    sample = ds[ds.origin.index(text)]
    assert sample["id"] != "text" and sample["skipped"][0][0] == text and "TypeError" in sample["skipped"][0][2]
    with pytest.raises(DataError, match=r"record 0 \(id='text'\): TypeError: .* \[internal-error\]"):
        dataset([records[text]], images, tok, "error")[0]
    real_problems = records_py.record_problems        # the same when the record checks themselves fail
    monkeypatch.setattr(records_py, "record_problems",
                        lambda r, *a: 1 / 0 if r == records[text] else real_problems(r, *a))
    assert {i: c for i, _, c, _ in check_data.check(records)["problems"]}[text] == "internal-error"
    assert text in {i for i, _, _ in dataset(path, images, tok).skipped}


def test_the_check_streams_its_findings(tmp_path, monkeypatch, capsys):
    """Problems are printed as found (a check interrupted at its last record has shown those before it), with a
    progress bar on stderr for large files."""
    Image.new("RGB", (4, 4)).save(tmp_path / "last.png")
    records = [{"id": f"r{i}", "image": f"missing{i}.png", "conversations": conv("<image>", "A.")} for i in range(3)]
    records.append({"id": "last", "image": "last.png", "conversations": conv("<image>", "A.")})
    (tmp_path / "d.json").write_text(json.dumps(records))
    real = data.load_image

    def load_image(p, *aspect):
        if p.endswith("last.png"):
            raise KeyboardInterrupt   # or a kill, an out-of-memory, a power cut
        return real(p, *aspect)
    monkeypatch.setattr(data, "load_image", load_image)
    with pytest.raises(KeyboardInterrupt):
        check_data.main([str(tmp_path / "d.json"), "--image-folder", str(tmp_path)])
    out = capsys.readouterr().out
    assert all(f"record {i} (id='r{i}'): cannot read image" in out for i in range(3)), out
    monkeypatch.undo()
    monkeypatch.setattr(check_data, "PROGRESS_MIN", 1)
    assert check_data.main([str(tmp_path / "d.json"), "--image-folder", str(tmp_path), "--show=1"]) == 1
    out, err = capsys.readouterr()
    assert "4/4" in err and "record 1 " not in out and "further problems are counted, not shown (--show 1)" in out
    assert "      3  image-missing" in out


def test_training_under_skip_leaves_out_and_reports_every_bad_record(tiny_llms, tiny_towers, tok, tmp_path, capsys):
    from accelerate.state import AcceleratorState
    import train
    path, images, bad, good = bad_dataset(tmp_path)
    args = [f"--llm={tiny_llms['llama']}", f"--vision_tower={tiny_towers['siglip']}", "--template=llama",
            f"--data_finetune={path}", f"--images_finetune={images}", f"--out_dir={tmp_path / 'run'}", "--bf16=false",
            "--num_workers=0", "--warmup_ratio=0", f"--max_length={MAX_LEN}", "--global_batch_size=4",
            "--micro_batch_size=4", "--epochs=1", "--bad_samples=skip",
            "--stages=[{'name': 'finetune', 'tune_llm': 'full'}]"]
    AcceleratorState._reset_state(True)
    try:
        final, losses = train.main(args)
    finally:
        AcceleratorState._reset_state(True)
    rows = json.load(open(os.path.join(final, "skipped.json")))
    assert {r["index"] for r in rows} == {i for i, c in bad.items() if c not in TRAINED_ON}
    assert f"{len(bad) - 1} records of {path} skipped" in capsys.readouterr().out
    assert all(x == x for x in losses["finetune"])


# ---- #23: what hung or was let through: a FIFO named .png, a square "pad" refuses, duplicate ids alone
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_image_set(root, name):
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump([{"id": name, "image": name, "conversations": conv(f"<image>\n{Q}", "A cat.")}], f)
    return path


def test_a_fifo_or_a_device_is_a_problem_not_a_hang(tok, tmp_path):
    """Only regular files are opened: opening a FIFO waits for a writer forever (the check hung, and so would
    training); a device (here /dev/zero through a link inside the image folder) is not an image either."""
    import subprocess
    import sys
    import threading
    images = tmp_path / "imgs"
    images.mkdir()
    os.mkfifo(images / "x.png")
    os.symlink("/dev/zero", images / "zero.png")
    path = one_image_set(tmp_path, "x.png")
    try:   # the command line, as a user runs it
        done = subprocess.run([sys.executable, "check_data.py", path, "--image-folder", str(images)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("check_data.py hung on a FIFO")
    finally:
        os.close(os.open(images / "x.png", os.O_RDWR | os.O_NONBLOCK))   # lets a blocked reader go
    assert done.returncode == 1, done.stderr
    assert (f"record 0 (id='x.png'): cannot read image {images}/x.png: a FIFO (named pipe), not a regular file "
            "[image-not-a-file]") in done.stdout
    report = check_data.check(data.read_records(one_image_set(tmp_path, "zero.png")), str(images))
    assert [(p[2], p[3].split(": ")[-1]) for p in report["problems"]] == [
        ("image-not-a-file", "a character device, not a regular file")]
    got = []   # training reads images through the same data.load_image

    def read():
        try:
            dataset(path, str(images), tok, "error")[0]
        except DataError as e:
            got.append(e)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():
        os.close(os.open(images / "x.png", os.O_RDWR | os.O_NONBLOCK))
        pytest.fail("training's data reading hung on a FIFO")
    assert got and got[0].code == "image-not-a-file" and "FIFO" in str(got[0])


def test_the_check_refuses_what_pad_refuses_with_the_configs_setting(tiny_llms, tiny_towers, tok, tmp_path, capsys):
    """A 1x15000 PNG (147 bytes) is fine square, but its padded square is over images.MAX_PAD_SIDE: training with
    image_aspect_ratio="pad" refuses it, so the check with that config (or --image-aspect-ratio pad) does too."""
    Image.new("RGB", (1, 15000)).save(tmp_path / "tall.png")
    path = one_image_set(tmp_path, "tall.png")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"llm = {tiny_llms['llama']!r}\nvision_tower = {tiny_towers['siglip']!r}\ntemplate = 'llama'\n"
                   "image_aspect_ratio = 'pad'\n")
    assert check_data.main([path, "--image-folder", str(tmp_path), "--config", str(cfg)]) == 1
    said = ("record 0 (id='tall.png'): cannot read image {}/tall.png: a 1x15000 image cannot be padded: its "
            "15000x15000 square is over images.MAX_PAD_SIDE = 8192 [image-too-large]").format(tmp_path)
    assert said in capsys.readouterr().out
    assert check_data.main([path, "--image-folder", str(tmp_path)]) == 0                      # square: fine
    assert check_data.main([path, "--image-folder", str(tmp_path), "--image-aspect-ratio", "pad"]) == 1
    proc = SiglipImageProcessor(size={"height": 16, "width": 16})
    with pytest.raises(DataError, match=r"record 0 \(id='tall.png'\): .* cannot be padded.*\[image-too-large\]"):
        VLMDataset(path, tok, proc, "llama", N_IMG, MAX_LEN, str(tmp_path), "pad")[0]   # training


def test_a_sliver_that_a_short_side_resize_would_blow_up_is_refused_square(tiny_llms, tiny_towers, tok, tmp_path,
                                                                          capsys):
    """CLIP-style processors resize the short side and keep the aspect ratio before the crop: a 1x15000 image became
    224 x 3,360,000 pixels (7.8 GB, 27 s for one image). Over images.MAX_IMAGE_PIXELS it is refused as one record's
    problem, by training and by the check with the config's tower; SigLIP's fixed-size resize takes it as before."""
    from transformers import CLIPImageProcessor
    Image.new("RGB", (1, 70000)).save(tmp_path / "sliver.png")   # the tiny CLIP's short side is 32: 32 x 2,240,000
    path = one_image_set(tmp_path, "sliver.png")
    said = (f"record 0 (id='sliver.png'): cannot read image {tmp_path}/sliver.png: a 1x70000 image resized to 32 px "
            f"on its short side would be 32x2240000 pixels, over images.MAX_IMAGE_PIXELS = {data.MAX_IMAGE_PIXELS} "
            "(crop it, or leave it out) [image-too-large]")
    for tower, bad in (("clip", True), ("siglip", False)):
        cfg = tmp_path / f"{tower}.py"
        cfg.write_text(f"llm = {tiny_llms['llama']!r}\nvision_tower = {tiny_towers[tower]!r}\ntemplate = 'llama'\n")
        assert check_data.main([path, "--image-folder", str(tmp_path), "--config", str(cfg)]) == int(bad), tower
        assert (said in capsys.readouterr().out) == bad
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with pytest.raises(DataError) as e:
        VLMDataset(path, tok, proc, "llama", N_IMG, MAX_LEN, str(tmp_path))[0]   # training: the check's words
    assert str(e.value) == f"{path}: {said}" and e.value.code == "image-too-large"
    with pytest.raises(DataError, match=r"^a 1x70000 image resized .*32x2240000 pixels"):   # a picture from memory
        preprocess_image(Image.open(tmp_path / "sliver.png"), proc)
    Image.new("RGB", (1, 60000)).save(tmp_path / "sliver.png")   # 32 x 1,920,000: under the limit, read as ever
    assert VLMDataset(path, tok, proc, "llama", N_IMG, MAX_LEN, str(tmp_path))[0]["pixel_values"].shape == (3, 32, 32)


def test_repeated_ids_alone_are_listed_and_the_exit_status_is_0(tmp_path, capsys):
    """The docs: a repeated id is listed but is not a bad sample, and the exit status is 1 only for a bad one."""
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    record = {"id": "a", "image": "ok.png", "conversations": conv(f"<image>\n{Q}", "A cat.")}
    (tmp_path / "dup.json").write_text(json.dumps([record, record]))
    assert check_data.main([str(tmp_path / "dup.json"), "--image-folder", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "record 1 (id='a'): id 'a' is also the id of record 0 [duplicate-id]" in out
    assert "1 with problems (0 bad; a repeated id alone is not)" in out and "      1  duplicate-id" in out
    (tmp_path / "dup.json").write_text(json.dumps([record, record, {**record, "image": "nope.png"}]))
    assert check_data.main([str(tmp_path / "dup.json"), "--image-folder", str(tmp_path)]) == 1
    assert "2 with problems (1 bad; a repeated id alone is not)" in capsys.readouterr().out

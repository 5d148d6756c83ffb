"""LLaVA-format records: reading a data file and checking each record as training will use it (record_problems,
scan), below data.py, which trains on them, and check_data.py, the command line that reports them.

    records = read_records("llava_v1_5_mix665k.json")   # a JSON list or JSONL; a bad JSONL line is a BadLine in place
    for i, record, problems in scan(records):           # problems: [(code, message)], e.g. ("image-outside", ...)
        ...
    records = load_records(path)                        # read_records + scan: DataError at the first bad record

DataError(message, code): a record cannot be a sample; the message names file, record index and id and ends in the
problem's code (listed in check_data.py), e.g. "data.json: record 3 (id='x'): ... [image-missing]".
"""
import json
import os
from collections import namedtuple

IMAGE_PLACEHOLDER = "<image>"
NOT_BAD = {"duplicate-id"}   # listed by scan, trained on: ids only name records in messages
MAX_IMAGES = 16   # images per sample over this are a bad sample (too-many-images); the max_images setting


class DataError(ValueError):
    """A record cannot be a training sample: the message names file, record index and id; .code the problem."""

    def __init__(self, message, code="bad-record"):
        super().__init__(message)
        self.code = code


BadLine = namedtuple("BadLine", "lineno error")   # a JSONL line that is not JSON, kept in place: indices stay


def _id(record):
    return record.get("id") if isinstance(record, dict) else None


def _where(source, index, record) -> str:
    at = f"line {record.lineno}" if isinstance(record, BadLine) else f"id={_id(record)!r}"
    return f"{source}: record {index} ({at})"


# ---- Reading -----------------------------------------------------------------------------------------------------
def read_records(path) -> list:
    """Parse a LLaVA-format JSON list or JSONL file (no validation); a JSONL line that is not JSON becomes a
    BadLine in its place, so the lines after it are still read. Bytes that are not UTF-8 become lone surrogates."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        text = f.read()
    records = _json(text)
    if isinstance(records, BadLine) and text.lstrip().startswith("["):
        raise DataError(f"{path}: invalid JSON at line {records.lineno}: {records.error}", "bad-json")
    # one object is a one-line JSONL file if it is a record; {"data": [...]} or a pretty-printed record is not
    if isinstance(records, dict) and ("conversations" not in records or "\n" in text.strip()):
        raise DataError(f"{path}: the top level must be a list of records (a JSON list, or JSONL: one record per "
                        f"line), not an object with keys {', '.join(map(repr, list(records)[:5]))}", "bad-top-level")
    if not isinstance(records, list):  # JSONL: one record per non-empty line (not splitlines: "\u2028" is no end)
        records = [_json(line, n) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not records:
        raise DataError(f"{path}: no records", "no-records")
    return records


def _json(text, lineno=1):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:   # RecursionError: nested too deeply
        return BadLine(lineno + getattr(e, "lineno", 1) - 1, getattr(e, "msg", "nested too deeply"))


def load_records(path) -> list[dict]:
    """read_records + scan: DataError at the first bad record (fail at startup, not at step 90k)."""
    records = read_records(path)
    for i, record, problems in scan(records):
        if problems:
            raise _error(path, i, record, problems)
    return records


def _error(source, index, record, problems) -> DataError:   # one line: where, then each problem and its code
    return DataError(f"{_where(source, index, record)}: {'; '.join(f'{m} [{c}]' for c, m in problems)}", problems[0][0])


def _turns(conversations, for_generation) -> list[tuple[str, str | None]]:
    """[{"from", "value"}, ...] -> [(question, answer)]; the answer of the last pair is None for generation."""
    msgs = list(conversations)
    # The original (TinyLLaVA `_get_list_from_message`) drops a first message that is not from the human, which
    # is how per-sample system prompts end up ignored. We keep that for parity with released checkpoints, but a
    # first message from the assistant is refused: dropping it would train on a conversation cut in the middle.
    skipped = int(bool(msgs) and msgs[0].get("from") not in ("human", "gpt"))
    msgs = msgs[skipped:]
    if for_generation and msgs and msgs[-1].get("from") == "gpt" and msgs[-1].get("value") is None:
        msgs = msgs[:-1]
    if not msgs:
        raise DataError("empty conversations", "empty-conversation")
    for t, m in enumerate(msgs):
        expected = "human" if t % 2 == 0 else "gpt"
        if m.get("from") != expected:
            code = "starts-with-assistant" if t == 0 and m.get("from") == "gpt" else "turns-not-alternating"
            raise DataError(f"turn {t + skipped} is from {m.get('from')!r}, expected {expected!r} "
                            "(turns must alternate human/gpt, starting with human)", code)
    if for_generation != (len(msgs) % 2 == 1):
        want = "a human turn (the question to answer)" if for_generation else "a gpt turn"
        raise DataError(f"conversations must end with {want}", "unanswered-last-turn")
    values = [m["value"] for m in msgs] + ([None] if for_generation else [])
    return list(zip(values[0::2], values[1::2]))


# ---- Checking ----------------------------------------------------------------------------------------------------
def record_images(record) -> list:
    """The record's image paths in placeholder order: 'image' as a list, a one-path list for a string, [] if none."""
    image = record.get("image") if isinstance(record, dict) else None
    return [] if image is None else list(image) if isinstance(image, list) else [image]


def record_problems(record, allow_outside_images=False, max_images=MAX_IMAGES) -> list[tuple[str, str]]:
    """[(code, message)] of one record: shape, text, turns, <image>s vs 'image' (a path, or a list of paths one per
    placeholder in order), repeated files, over max_images (None: no limit), a path outside the image folder."""
    if isinstance(record, BadLine):
        return [("bad-jsonl-line", f"bad JSON line: {record.error}")]
    if not isinstance(record, dict):
        return [("not-an-object", f"record is a {type(record).__name__}, expected an object")]
    convs = record.get("conversations")
    if not isinstance(convs, list):
        return [("no-conversations", "missing or non-list 'conversations'")]
    for t, turn in enumerate(convs):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return [("bad-turn", f"turn {t} must be {{'from': str, 'value': str}}, got {turn!r:.80}")]
    problems = []
    texts = [v for v in [record.get("id")] + record_images(record) if isinstance(v, str)]
    try:   # json.load accepts a lone surrogate ("\ud800"), and a tokenizer then fails with a TypeError
        "".join(texts + [m["from"] + m["value"] for m in convs]).encode("utf-8")
    except UnicodeEncodeError:
        problems.append(("text-unencodable", "text that cannot be encoded (a lone surrogate such as '\\ud800')"))
    problems += [("empty-turn", f"turn {t} ({turn['from']}) is empty") for t, turn in enumerate(convs)
                 if not turn["value"].strip()]
    try:
        _turns(convs, for_generation=False)
    except DataError as e:
        problems.append((e.code, str(e)))
    n_tags = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in convs if turn["from"] != "gpt")
    image = record.get("image")
    if any(IMAGE_PLACEHOLDER in turn["value"] for turn in convs if turn["from"] == "gpt"):
        problems.append(("image-in-answer", f"{IMAGE_PLACEHOLDER} inside a gpt turn"))
    if isinstance(image, list) and not image:
        problems.append(("empty-image-list", "'image' is an empty list (leave it out for a text-only sample)"))
    elif image is not None and not all(isinstance(x, str) and x for x in record_images(record)):
        problems.append(("bad-image-field", f"'image' must be a non-empty relative path or a list of them, got "
                                            f"{image!r:.80}"))
    elif isinstance(image, list) and n_tags != len(image):
        problems.append(("image-count-mismatch", f"{len(image)} images in 'image' but {n_tags} "
                                                 f"{IMAGE_PLACEHOLDER} placeholders (one per image, in order)"))
    elif image is not None and n_tags == 0:
        problems.append(("image-without-placeholder", f"has 'image' but no {IMAGE_PLACEHOLDER} in its text"))
    elif image is None and n_tags:
        problems.append(("placeholder-without-image", f"has {IMAGE_PLACEHOLDER} in its text but no 'image'"))
    elif n_tags > 1 and not isinstance(image, list):
        problems.append(("image-count-mismatch", f"{n_tags} {IMAGE_PLACEHOLDER} placeholders but one image: "
                                                 "several images are a list, one per placeholder"))
    files = [x for x in record_images(record) if isinstance(x, str)]
    if len(set(map(os.path.normpath, files))) < len(files):
        problems.append(("repeated-image", "the same image file twice in 'image' (a list of distinct files)"))
    if max_images and len(files) > max_images:
        problems.append(("too-many-images", f"{len(files)} images, over max_images={max_images}"))
    # lexical, so that a data set laid out with symbolic links inside the image folder still works
    outside = [x for x in files if os.path.isabs(x) or os.path.normpath(x).split(os.sep)[0] == ".."]
    if outside and not allow_outside_images:
        problems.append(("image-outside", f"image path {outside[0]!r} leaves the image folder (allow_outside_images)"))
    return problems


def scan(records, allow_outside_images=False, max_images=MAX_IMAGES):
    """(index, record, [(code, message)]) per record: record_problems, duplicate-id, internal-error (an exception)."""
    first = {}
    for i, record in enumerate(records):
        try:
            problems = record_problems(record, allow_outside_images, max_images)
        except Exception as e:  # noqa: BLE001 - one record's surprise must not stop a check of 600k
            problems = [("internal-error", f"{type(e).__name__}: {e}")]
        rid = record.get("id") if isinstance(record, dict) else None
        if rid is not None and first.setdefault(repr(rid), i) != i:   # repr: 1 and "1" are different ids
            problems.append(("duplicate-id", f"id {rid!r} is also the id of record {first[repr(rid)]}"))
        yield i, record, problems

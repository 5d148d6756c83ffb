"""
What every flag of every script accepts, declared once and checked where the value enters, before anything heavy
loads: a bad value is one line naming the flag, the value and what is allowed (`<script>: error: ...`, exit 2).

    from settings import Float, Int, Model, Parser
    p = Parser(prog="chat.py", description=__doc__)          # argparse, its errors one line
    p.add_argument("--max-new-tokens", type=Int(1), default=512)   # a rule is argparse's type=
    TRAIN["epochs"]                                          # train.py's keys (recipes.load_config checks them)

Rules: Int and Float (finite, in range), Bool, Choice (names, or patterns), Text, Names (a list of names), Stages
(train.py's list of stage dicts: its shape), and those that look at the disk: File, Folder, Exists, Image, Model (a
folder, or a Hub id: "no folder /x, and not a Hub id"), Output (a file or folder that can be written: tried by making
one there) and Device (the name here; Device.missing, once torch is imported: whether this machine has it).
rule.parse(value) returns the value in its type, else raises ValueError("expected <what is allowed>, got <value>");
rule.check(name, value) raises ConfigError("<name>: ..."). Parser accepts both spellings of every flag
(--max-new-tokens and --max_new_tokens; train.py's keys are names with underscores and take dashes too), and its
--help, like say(), ends quietly when the reader has gone (| head).

The standard library only, and of this project only errors.py (which imports nothing): every script imports this
before its arguments are parsed, so --help and a refused value cost no torch.
"""
import argparse
import ast
import json
import math
import os
import re
import sys
import tempfile

from errors import ConfigError   # (recipes.ConfigError: each script prints it as one line, exit status 2)

TEMPLATES = ("phi", "llama", "gemma", "qwen2_base", "qwen2_instruct", "pretrain", "auto")   # data.TEMPLATES (tested)
DTYPES = ("float32", "bfloat16", "float16")                                                 # model.DTYPES (tested)
SEED_MAX = 2 ** 32 - 1   # every seed fits numpy's, torch's and Python's generators


class Rule:
    """What a setting accepts. parse(value) -> the value in its type, or a ValueError saying what was expected."""
    what, disk = "a value", False   # disk: looks at the file system (train.py: in check_settings, not at parsing)

    def bad(self, value, what=None):
        got = repr(value)
        return ValueError(f"expected {what or self.what}, got {got if len(got) <= 80 else got[:60] + '...'}")

    def parse(self, value):
        return value

    def check(self, name, value, disk=True):
        """parse(value), a ConfigError naming `name` (e.g. "--epochs") otherwise; disk=False: the type alone."""
        try:
            return self.parse(value) if disk or not self.disk else Text().parse(value)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None

    def __call__(self, text):   # argparse's type=: its message becomes "<prog>: error: --flag: <message>"
        try:
            return self.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def _span(low=None, high=None, above=None, below=None):
    """ " >= 1", " from 0 to 1", " > 0 and <= 1": a range as the messages say it."""
    n = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
    if low is not None and high is not None:
        return f" from {n(low)} to {n(high)}"
    parts = [f"> {n(above)}" if above is not None else f">= {n(low)}" if low is not None else "",
             f"< {n(below)}" if below is not None else f"<= {n(high)}" if high is not None else ""]
    return " " + " and ".join(p for p in parts if p) if any(parts) else ""


class Int(Rule):
    """A whole number (1e3 too), low <= n <= high; `also`: values allowed outside the range (e.g. -1: all)."""

    def __init__(self, low=None, high=None, also=(), what=None):
        self.low, self.high, self.also = low, high, also
        self.what = what or "a whole number" + _span(low, high) + "".join(f" (or {v})" for v in also)

    def parse(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.bad(value)
        try:
            n = int(value) if isinstance(value, int) else int(str(value).strip())   # exact, however large
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                raise self.bad(value) from None
            if not math.isfinite(f) or f != int(f):
                raise self.bad(value) from None
            n = int(f)
        if n not in self.also and (self.low is not None and n < self.low or self.high is not None and n > self.high):
            raise self.bad(value)
        return n


class Float(Rule):
    """A finite number in [low, high], or above / below a bound that it may not equal."""

    def __init__(self, low=None, high=None, above=None, below=None, what=None):
        self.low, self.high, self.above, self.below = low, high, above, below
        self.what = what or "a number" + _span(low, high, above, below)

    def parse(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.bad(value)
        try:
            v = float(value)
        except (ValueError, OverflowError):   # (10 ** 400 has no float)
            raise self.bad(value) from None
        if not (math.isfinite(v) and (self.low is None or v >= self.low) and (self.high is None or v <= self.high)
                and (self.above is None or v > self.above) and (self.below is None or v < self.below)):
            raise self.bad(value)
        return v


class Bool(Rule):
    def __init__(self, also=()):
        self.also, self.what = also, "/".join(("true", "false", *also))

    def parse(self, value):
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in self.also:
            return word
        if word in ("true", "1", "yes") or word in ("false", "0", "no"):
            return word in ("true", "1", "yes")
        raise self.bad(value)


class Choice(Rule):
    """One of `names` (str, or int: "8" is 8), or a full match of one of `patterns`."""

    def __init__(self, *names, patterns=(), what=None):
        self.names, self.patterns = names, patterns
        self.what = what or "one of " + ", ".join(repr(n) if n == "" else str(n) for n in names)

    def parse(self, value):
        for n in self.names:
            if value == n and type(value) is type(n) or isinstance(value, str) and value == str(n):
                return n
        if isinstance(value, str) and any(re.fullmatch(p, value) for p in self.patterns):
            return value
        raise self.bad(value)


class Text(Rule):
    what = "a string"

    def parse(self, value):
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(value, str):
            raise self.bad(value)
        return value


def literal(value, rule):
    """A command line's Python literal ("['q_proj']"), as it is for a config file's value."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise rule.bad(value) from None
    return value


class Names(Rule):
    what = "a list of names like ['q_proj', 'v_proj']"

    def parse(self, value):
        names = literal(value, self)
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise self.bad(value)
        return list(names)


class Stages(Rule):
    """train.py's own recipe: a list of dicts, each with a name (letters, digits, _; one per stage) and what it
    changes. Its keys and their values are checked by recipes.stage_configs with the run's other settings."""
    what = "a list of stages like [dict(name='finetune', data='finetune', tune_llm='full', lr=2e-5)]"

    def parse(self, value):
        stages = literal(value, self)
        if not isinstance(stages, (list, tuple)) or not all(isinstance(s, dict) for s in stages):
            raise self.bad(value)
        names = [s.get("name") for s in stages]
        for s, name in zip(stages, names):
            if not isinstance(name, str) or not re.fullmatch(r"\w+", name):
                raise self.bad(value, "a name (letters, digits, _) in every stage, like [dict(name='finetune', ...)]")
            if names.count(name) > 1:
                raise self.bad(value, f"a different name for each stage ({name!r} is used twice)")
            if not all(isinstance(k, str) for k in s) or not isinstance(s.get("data", ""), str):
                raise self.bad(value)
        return [dict(s) for s in stages]


# ----------------------------------------------------------------------------- rules that look at the disk
class File(Rule):
    disk, what = True, "a file"

    def parse(self, value):
        value = Text().parse(value)
        if os.path.isdir(value):
            raise ValueError(f"{value} is a folder, not a file")
        if not os.path.exists(value):
            raise ValueError(f"no file {value}")
        return value


class Folder(Rule):
    disk, what = True, "a folder"

    def parse(self, value):
        value = Text().parse(value)
        if not os.path.isdir(value):
            raise ValueError(f"{value} is a file, not a folder" if os.path.exists(value) else f"no folder {value}")
        return value


class Exists(Rule):
    disk, what = True, "a file or folder"

    def parse(self, value):
        if not os.path.exists(Text().parse(value)):
            raise ValueError(f"no file or folder {value}")
        return value


class Image(File):
    """A file that PIL opens as an image (chat.py --image: checked before the model loads)."""

    def parse(self, value):
        value = super().parse(value)
        from PIL import Image as PILImage, UnidentifiedImageError
        try:
            with PILImage.open(value) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
            raise ValueError(f"{value} is not an image that can be read ({type(e).__name__}: {e})") from None
        return value


def is_hub_id(name):
    """The shape of a Hugging Face Hub repository id: name or owner/name (letters, digits, - _ .)."""
    return bool(re.fullmatch(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}", name)) and not re.search(r"--|\.\.|(^|/)[-.]|[-.]($|/)",
                                                                                           name)


class Model(Rule):
    """A model (or tokenizer) folder, or a Hub id, as transformers' from_pretrained takes; empty=True: "" too."""
    disk, what = True, "a model folder or a Hub id (owner/name)"

    def __init__(self, empty=False):
        self.empty = empty

    def parse(self, value):
        value = Text().parse(value)
        if os.path.isdir(value) or value == "" and self.empty or not os.path.exists(value) and is_hub_id(value):
            return value
        if not value:
            raise self.bad(value)
        raise ValueError(f"{value} is a file, not a model folder" if os.path.exists(value) else
                         f"no folder {value}, and not a Hub id (owner/name)")


def unwritable(path, folder=True):
    """Why `path` (a folder made with its parents, or a file in an existing folder) cannot be written, else None:
    tried by making a file where it goes (permissions alone do not tell, for root or /proc), unnamed (O_TMPFILE) so
    that no one listing the folder meanwhile sees it."""
    if os.path.isdir(path):
        if not folder:
            return f"{path} is a folder, not a file"
        where = path
    elif os.path.lexists(path):
        if folder:
            return f"{path} is a file, not a folder"
        try:   # opened to append: nothing written
            open(path, "a").close()
            return None
        except OSError as e:
            return f"cannot write {path}: {e.strerror or e}"
    else:
        where = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(where):
            if not folder:
                return f"cannot write {path}: no folder {os.path.dirname(path) or '.'}"
            if os.path.lexists(where):
                return f"cannot make {path}: {where} is a file"
            where = os.path.dirname(where)
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        return f"cannot write {path}: cannot make a file in {where} ({e.strerror or e})"
    return None


class Output(Rule):
    """A folder (or, folder=False, a file) that can be written: it, or its nearest existing parent, is tried."""
    disk = True

    def __init__(self, folder=True, empty=False):
        self.folder, self.empty = folder, empty
        self.what = "a folder that can be written" if folder else "a file that can be written"

    def parse(self, value):
        value = Text().parse(value)
        if value == "" and self.empty:
            return value
        if not value:
            raise self.bad(value)
        problem = unwritable(value, self.folder)
        if problem:
            raise ValueError(problem)
        return value


class Device(Rule):
    """A torch device name (cpu, cuda, cuda:1, mps, xpu); missing(): whether this machine has it (imports torch)."""
    what = "cpu, cuda, cuda:N, mps, xpu or xpu:N"

    def parse(self, value):
        if not isinstance(value, str) or not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", value):
            raise self.bad(value)
        return value

    @staticmethod
    def missing(name):
        """A line saying that this machine has no such device, else None."""
        if not name:
            return None
        import torch
        kind, _, index = name.partition(":")
        have = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                "mps": int(torch.backends.mps.is_available()),
                "xpu": torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0}[kind]
        if int(index or 0) < have:
            return None
        return f"--device: {name}, but this machine has " + (f"{have} {kind} device(s)" if have else
                                                             f"no {kind.upper()} device (cpu runs everywhere)")


# ----------------------------------------------------------------------------- train.py's keys (recipes.DEFAULTS)
CONNECTOR = Choice("identity", "linear", "qformer", "resampler", "mof_mlp",
                   patterns=(r"mlp[1-9]\d*x_gelu", r"pixel_shuffle[1-9]\d*_mlp[1-9]\d*x_gelu"),
                   what="identity, linear, mlp{N}x_gelu, qformer, resampler, mof_mlp or pixel_shuffle{S}_mlp{N}x_gelu")
TUNE = r"partial:\d+"
TRAIN = dict(
    llm=Model(empty=True), tokenizer=Model(empty=True), vision_tower=Model(empty=True),
    vision_tower2=Model(empty=True), connector=CONNECTOR, vision_feature_layer=Int(),
    vision_feature_select_strategy=Choice("patch", "cls_patch"), legacy_patch_drop=Bool(), num_queries=Int(1),
    num_resampler_layers=Int(1), trust_remote_code=Bool(),
    attn_implementation=Choice("", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"),
    dtype=Choice(*DTYPES), init_from=Model(empty=True),
    template=Choice(*TEMPLATES), image_aspect_ratio=Choice("square", "pad"), max_tiles=Int(0, 64), max_length=Int(1),
    **{f"{kind}_{name}": Text() for kind in ("data", "images")
       for name in ("pretrain", "finetune", "share", "share_finetune", "val")},
    group_by_length=Bool(), bad_samples=Choice("error", "skip"), check_data_at_start=Bool(), max_images=Int(1),
    allow_outside_images=Bool(), feature_cache=Output(empty=True), num_workers=Int(0), threads=Int(0),
    recipe=Text(), stages=Stages(), tune_llm=Choice("frozen", "full", "lora", "qlora", patterns=(TUNE,)),
    tune_vision_tower=Choice("frozen", "full", "lora", patterns=(TUNE,)), tune_connector=Choice("frozen", "full",
                                                                                                "lora"),
    lora_r=Int(1), lora_alpha=Int(1), lora_dropout=Float(0, below=1), lora_target_modules=Names(),
    qlora_bits=Choice(4, 8),
    lr=Float(0), lr_llm=Float(0), lr_vision_tower=Float(0), lr_connector=Float(0), weight_decay=Float(0),
    warmup_ratio=Float(0, 1), grad_clip=Float(0), global_batch_size=Int(1), micro_batch_size=Int(1), epochs=Int(1),
    max_steps=Int(0), bf16=Bool(), fp16=Bool(), gradient_checkpointing=Bool(also=("auto",)), compile=Bool(),
    max_nonfinite_steps=Int(1), peak_flops=Float(0), seed=Int(0, SEED_MAX),
    out_dir=Output(), log_every=Int(1), val_every=Int(0), val_batches=Int(1), save_every=Int(0),
    keep_checkpoints=Int(0), tracker=Text(), resume=Bool(), resume_allow=Text(), overwrite=Bool(),
)


def tower_layers(path):
    """The layer count in a local vision tower's config.json (CLIP's full config: its vision_config), else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        return int(config.get("vision_config", config)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ----------------------------------------------------------------------------- the command line
def quiet_pipe():
    """stdout's reader has gone (`... --help | head`): the rest goes nowhere, not into a BrokenPipeError."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def say(text):
    """print(text), ending quietly if the reader has gone."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        quiet_pipe()


def spelled(args, known):
    """--max_new_tokens as --max-new-tokens where only that is known (and the other way round); after a bare "--",
    arguments stay as they are."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if arg.startswith("--") and name not in known:
            for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if other in known:
                    out[i] = other + eq + value
                    break
    return out


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`<prog>: error: --flag: ...`, exit 2, no usage block), both spellings of each
    flag, and a --help that a closed pipe does not turn into a traceback."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(spelled(args, self._option_string_actions), namespace)

    def error(self, message):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else message}\n")

    def print_help(self, file=None):
        super().print_help(file)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            quiet_pipe()

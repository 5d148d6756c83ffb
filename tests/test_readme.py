"""The README's claims about the code stay true: the file sizes it states, and each core file readable in one
sitting (style.md, issue #17: at most 500 lines)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))   # every top-level file


def lines(name):
    with open(os.path.join(ROOT, name)) as f:
        return len(f.read().splitlines())


def test_readme_states_each_file_size_within_5_percent():
    with open(os.path.join(ROOT, "README.md")) as f:
        stated = dict(re.findall(r"^\| `([\w./]+\.py)` \| (\d+) \|", f.read(), re.M))
    assert set(CORE) <= set(stated), f"README's file table misses {sorted(set(CORE) - set(stated))}"
    for name, n in stated.items():
        assert abs(lines(name) - int(n)) <= max(5, 0.05 * lines(name)), f"README says {name} has {n} lines: {lines(name)}"


def test_core_files_stay_readable():
    assert {name: lines(name) for name in CORE if lines(name) > 500} == {}


def readme_commands():
    """The README's shell commands, continuation lines joined, comments cut."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), re.M | re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def test_readme_train_commands_resolve_and_their_batches_divide():
    """Every train.py command of the README, as written: its keys exist, its stages resolve, and each stage's global
    batch divides into micro-batches x the processes that command launches (the yaml's num_processes or its flag)."""
    import shlex

    import yaml

    import train
    cmds = [c for c in readme_commands() if " train.py" in c]
    assert len(cmds) >= 6
    cwd = os.getcwd()
    os.chdir(ROOT)   # configs are named relative to the repository
    try:
        for cmd in cmds:
            words = shlex.split(cmd)
            launcher, args = words[:words.index("train.py")], words[words.index("train.py") + 1:]
            world = 1
            if "--config_file" in launcher:
                with open(launcher[launcher.index("--config_file") + 1]) as f:
                    world = yaml.safe_load(f)["num_processes"]
            if "--num_processes" in launcher:
                world = int(launcher[launcher.index("--num_processes") + 1])
            for stage in train.stage_configs(train.load_config(args)):
                assert stage["global_batch_size"] % (stage["micro_batch_size"] * world) == 0, (cmd, stage["stage"])
    finally:
        os.chdir(cwd)


def test_every_script_answers_help():
    import subprocess
    import sys
    modules = ("answers.py", "checkpoints.py", "connectors.py", "data.py", "errors.py", "feature_cache.py", "flops.py",
               "folders.py", "images.py",
               "layouts.py", "model.py", "modeling_tinyllava_nano.py", "recipes.py", "records.py", "run_log.py",
               "scorers.py", "settings.py", "stage_check.py")
    for script in sorted(f for f in CORE if f not in modules):
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "Traceback" not in p.stderr and len(p.stdout) > 200, (script, p.stderr[-1000:])
        assert "=== stage" not in p.stdout, script   # --help ran nothing

"""The README's claims about the code stay true: the file sizes it states, and each core file readable in one
sitting (style.md: under about 500 lines)."""
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
    assert {name: lines(name) for name in CORE if lines(name) > 550} == {}

"""The README as a newcomer uses it: its Python example runs on the real model, its commands are the
ones CI runs, and every file it cites exists."""
import glob
import itertools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def cited_paths(text):
    """Every `results/...` or `heads/...` file a text names, braces expanded ({a,b} -> a, b) and globs
    kept, and any bare `name.txt` as a file somewhere under results/; `git show REV:path` is history."""
    text = re.sub(r"git show [0-9a-f^]+:\S+", "", text)
    paths = set()
    for spec in re.findall(r"(?<![\w/.])((?:results|heads)/[\w/.*{},-]+\.(?:txt|jsonl?|log|py|sh|pt|md))(?!\w)", text):
        parts = re.split(r"\{([^}]*)\}", spec)  # literal, alternatives, literal, ...
        choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
        paths |= {"".join(c) for c in itertools.product(*choices)}
    bare = re.findall(r"`(\w[\w.-]*\.(?:txt|json|log))`", text)  # a log named in a table under results/
    return sorted(paths | {f"results/**/{name}" for name in bare})


def test_readme_example_runs_on_the_real_model(smollm, monkeypatch, capsys):
    """Guards the example a newcomer copies first: it imports only model.py and cerberus.py, loads the
    shipped heads, and decodes (the session's loaded model stands in for load_smollm2)."""
    blocks = python_blocks(read("README.md"))
    assert blocks, "the README lost its Python example"
    monkeypatch.chdir(ROOT)  # the example opens heads/cerberus.pt relative to the repository
    monkeypatch.setattr("model.load_smollm2", lambda *args, **kwargs: smollm)
    for block in blocks:
        assert "import train" not in block and "from train" not in block, "decoding must not need train.py"
        scope = {}
        exec(compile(block, "README.md", "exec"), scope)
        assert scope["ids"] and scope["stats"].tokens_per_step >= 1.0
    assert "tokens per step" in capsys.readouterr().out


def test_readme_opens_with_the_two_commands_and_the_second_is_ci():
    """The first lines are what a fresh machine runs: the benchmark, and the tests exactly as CI runs them."""
    first = re.search(r"```bash\n(.*?)```", read("README.md"), flags=re.S).group(1).strip().splitlines()
    ci = [line for line in read(".ci/run").splitlines() if "pytest" in line]
    assert len(first) == 2 and first[0].endswith("python bench.py") and first[1] == ci[0].strip()


@pytest.mark.parametrize("doc", ["README.md", "results/README.md"])
def test_every_cited_file_exists(doc):
    """A figure is only as good as its log: every results/ and heads/ file a README names is in the
    repository (globs must match at least one)."""
    missing = [p for p in cited_paths(read(doc)) if not glob.glob(os.path.join(ROOT, p), recursive=True)]
    assert not missing, f"{doc} cites files that are not in the repository: {missing}"

"""The README's plain-PyTorch example runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_plain_pytorch_example_runs():
    text = README.read_text()
    section = text.split("## Use FLoRAL in plain PyTorch", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    exec(compile(code, str(README), "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()


def grid_commands(text: str) -> list[list[str]]:
    """Every line of ``text`` that starts with ``python -m experiments`` (continuation lines joined), as the
    runner's arguments."""
    text = text.replace("\\\n", " ")
    return [shlex.split(line)[3:] for line in re.findall(r"^python -m experiments [^\n]*", text, flags=re.M)]


def test_every_grid_command_in_the_readme_and_the_committed_results_is_one_the_runner_accepts():
    from experiments.grid import parse_args

    commands = grid_commands(README.read_text())
    assert len(commands) == 5  # the how-to, the command of results/mnist, the three cluster-init grids
    for results_md in sorted((README.parent / "results").glob("*/results.md")):
        (line,) = re.findall(r"^Command: `(python -m experiments [^`]*)`$", results_md.read_text(), flags=re.M)
        commands += grid_commands(line)
    assert len(commands) == 8
    for argv in commands:
        args = parse_args(argv)  # exits (naming the argument) on anything it does not accept
        assert args.command == "compare" and args.tasks and args.methods


def test_the_readme_mutation_score_is_the_recorded_one_and_covers_every_mutant_of_the_tool():
    import json
    import sys

    sys.path.insert(0, str(README.parent / "tools"))
    import mutate  # the tool's own list of mutants

    record = json.loads((README.parent / "tools" / "mutation.json").read_text())
    scores = record["scores"]["all"]
    assert scores["survived"] == scores["stale"] == scores["not-run"] == 0
    assert {m["id"] for m in record["mutants"]} == {m.id for m in mutate.MUTANTS}  # each mutant has a result
    killed, equivalent = scores["killed"], scores["equivalent"]
    assert f"**{killed} of {killed} non-equivalent mutants killed (100 %)**" in README.read_text()
    assert f"{equivalent} equivalent mutants" in README.read_text()
    assert f"all {killed + equivalent} apply" in README.read_text()
    for mutant in mutate.MUTANTS:  # and each still applies to the code: its snippet is there, exactly once
        assert (README.parent / mutant.file).read_text().count(mutant.find) == 1, mutant.id

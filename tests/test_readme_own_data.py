"""The README's end-to-end example of the user's own federated data runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_own_data_example_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Your own federated data", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "sites_model" / "model.safetensors").is_file()

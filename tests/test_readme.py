"""The README's code blocks run, its schema file is current, and CI runs its test command."""

import json
import os
import re
from pathlib import Path

import pytest

from prune_plugin import PruningPolicy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_blocks_run(index, tmp_path, capsys):
    code = _blocks("python")[index]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out.strip()
    if printed:  # a block that prints is followed by its real output
        following = README.split(code, 1)[1]
        shown = re.search(r"```text\n(.*?)```", following, re.S).group(1).strip()
        assert printed == shown


def test_schema_file_is_current():
    on_disk = json.loads((ROOT / "docs" / "policy.schema.json").read_text())
    assert on_disk == PruningPolicy.model_json_schema(), \
        "regenerate docs/policy.schema.json from PruningPolicy.model_json_schema()"


def test_ci_runs_the_readme_test_command():
    command = _blocks("bash")[1].strip()
    assert command in (ROOT / ".ci" / "run").read_text()

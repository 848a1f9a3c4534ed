"""The README's code blocks run, its schema file is current, and CI runs its test command."""

import json
import os
import re
from pathlib import Path

import pytest

from prune_plugin import PruningPolicy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: The README and the docs pages, whose code blocks are checked alike.
PAGES = {"README.md": README, **{f"docs/{p.name}": p.read_text()
                                 for p in sorted((ROOT / "docs").glob("*.md"))}}


def _blocks(lang: str, pages: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(page, code) of the pages' ``lang`` code blocks, less fragments (first line
    ``# fragment: ...``, code that needs a launcher; each names the complete script the tests
    run instead)."""
    found = []
    for page, text in (pages or PAGES).items():
        found += [(page, b) for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S)
                  if not b.startswith("# fragment:")]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_blocks_run(index, tmp_path, capsys):
    page, code = _blocks("python")[index]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, f"{page} python block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out.strip()
    following = PAGES[page].split(code, 1)[1].split("```", 1)[1]  # after the block's fence
    shown = re.match(r"\s*```text\n(.*?)```", following, re.S)
    if shown:  # output shown right after a block is the block's real output
        assert printed == shown.group(1).strip()


def test_readme_is_short_and_links_every_docs_page():
    assert len(README.splitlines()) <= 200
    for page in PAGES:
        if page.startswith("docs/"):
            assert f"({page})" in README, f"the README links no {page}"


def test_schema_file_is_current():
    on_disk = json.loads((ROOT / "docs" / "policy.schema.json").read_text())
    assert on_disk == PruningPolicy.model_json_schema(), \
        "regenerate docs/policy.schema.json from PruningPolicy.model_json_schema()"


def test_deepspeed_config_block_is_a_valid_entry():
    from prune_plugin.integrations.deepspeed import read_policy

    (config,) = [json.loads(b) for _, b in _blocks("json") if "movement_pruning" in b]
    assert read_policy(config).method == "movement"


def test_ci_runs_the_readme_test_command():
    command = next(b.strip() for _, b in _blocks("bash", {"README.md": README})
                   if "pytest" in b)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_policy_reference_is_current():
    from prune_plugin.cli import policy_reference

    text = PAGES["docs/policies.md"]
    shown = text.split("<!-- generated: prune-plugin schema --markdown -->\n", 1)[1]
    assert shown.split("<!-- end generated -->", 1)[0] == policy_reference(), \
        "regenerate docs/policies.md's reference with prune-plugin schema --markdown"

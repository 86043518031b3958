"""The README's and the documentation's Python blocks run, offline, as a new user copies them; the CLI
page is what `pathsurgeon --help` prints; the API page lists every public name.

Every ```python block of README.md and docs/**/*.md runs: the blocks of one page in order, in one fresh
Python process in an empty folder (a block sees what the blocks above it on its page defined, as a reader
following the page does), with HF_HUB_OFFLINE=1. Where a block names a big model or downloaded weights,
the run substitutes as SUBSTITUTES says, and nothing else. A block that cannot run on its own (a
distributed launch on several processes) says why in a `<!-- not run: REASON -->` line just before it;
those are counted, and there may be at most MAX_NOT_RUN of them.

    python tests/test_readme.py --write-cli   # writes docs/reference/cli.md's --help section again
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pathsurgeon

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_PAGE = DOCS / "reference" / "cli.md"
API_PAGE = DOCS / "reference" / "api.md"
ERRORS_PAGE = DOCS / "reference" / "errors.md"

# What a documentation block names -> what the test runs instead. ViT-Tiny is ViT-B/16's architecture at
# a fifth of the width (12 blocks, 24 branches: every number a block prints holds); no test downloads.
SUBSTITUTES = {"vit_base_patch16_224": "vit_tiny_patch16_224", "pretrained=True": "pretrained=False"}
MAX_NOT_RUN = 1
BLOCK = re.compile(r"^(?:<!-- not run: (?P<reason>[^\n]*?) -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def documented_pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def blocks(page: Path) -> list[tuple[str, str | None]]:
    """(code, reason it is not run, or None) for every ```python block of the page, in order."""
    text = page.read_text()
    found = [(match["code"], match["reason"]) for match in BLOCK.finditer(text)]
    # every block is found: none indented (inside a list) or otherwise missed
    assert len(found) == text.count("```python"), f"{page}: a ```python block the runner does not see"
    return found


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    for name, substitute in SUBSTITUTES.items():
        code = code.replace(name, substitute)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=environment)


# README's blocks are the quick start, run (with what it prints checked) by the test below.
PAGES_WITH_BLOCKS = [page for page in documented_pages()[1:] if any(reason is None for _, reason in blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=lambda page: str(page.relative_to(DOCS)))
def test_documentation_blocks_run_offline(page, tmp_path):
    # a page's blocks that are README's quick start word for word (docs/index.md) run in the test below
    code = "\n".join(code for code, reason in blocks(page) if reason is None and code not in python_blocks())
    if not code.strip():
        return
    result = _run(code, tmp_path)
    assert result.returncode == 0, f"{page.relative_to(ROOT)}: {result.stderr[-3000:]}"


def test_readme_holds_only_the_quick_start_blocks():
    """The generic runner leaves README to test_quick_start_runs_offline_as_written: so it may hold no
    other block."""
    assert len(blocks(README)) == 2 == len(python_blocks())


def test_blocks_not_run_are_few_and_say_why():
    not_run = [(page.relative_to(ROOT), reason) for page in documented_pages() for _, reason in blocks(page)
               if reason is not None]
    assert all(reason.strip() for _, reason in not_run)
    assert len(not_run) <= MAX_NOT_RUN, not_run
    run = sum(reason is None for page in documented_pages() for _, reason in blocks(page))
    assert run >= 7  # the quick start, DropPathConfig, and at least one block on each guide page with code


@pytest.mark.slow
def test_quick_start_runs_offline_as_written(tmp_path):
    """The first two blocks (the quick start and DropPathConfig), run with no network in a fresh folder.

    As written the block builds vit_base_patch16_224 (about a minute here); the test runs it on
    vit_tiny_patch16_224, the same architecture with 12 blocks too, so that every printed claim holds.
    """
    quick_start, config = python_blocks()[:2]
    code_only = "\n".join(line.split("#")[0] for line in quick_start.splitlines())
    assert "pretrained=True" not in code_only  # the comment above the call explains it
    assert re.search(r"create_model\(\"vit_base_patch16_224\", pretrained=False\)", quick_start)
    code = (quick_start + config).replace("vit_base_patch16_224", "vit_tiny_patch16_224")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "24 branches in 12 blocks" in result.stdout  # what the block's comment promises
    assert (tmp_path / "runs" / "vit" / "pathsurgeon.json").is_file()


def _keys(text: str, start: int = 0) -> tuple[dict[str, dict | None], int]:
    """The README's key outline `{"a", "b": [{"c"}]}` as {"a": None, "b": {"c": None}}."""
    keys: dict[str, dict | None] = {}
    position = start + 1  # past "{"
    while text[position] != "}":
        if text[position] == '"':
            end = text.index('"', position + 1)
            name, position = text[position + 1:end], end + 1
            keys[name] = None
            if text.startswith(": [{", position):
                keys[name], position = _keys(text, position + 3)
                position = text.index("]", position) + 1
        else:
            position += 1
    return keys, position + 1


def _outline(value: object) -> dict[str, dict | None]:
    return {key: _outline(item[0]) if isinstance(item, list) and item and isinstance(item[0], dict) else None
            for key, item in value.items()}


def test_json_key_list_is_what_add_json_writes(tmp_path, capsys):
    import json

    from pathsurgeon import cli

    bullet = CLI_PAGE.read_text().split("- `--json FILE`", 1)[1].split("\n- ", 1)[0]
    outline = " ".join(bullet.split("`{", 1)[1].split("}`", 1)[0].split())
    documented, _ = _keys("{" + outline + "}")
    assert cli.main(["add", "--model", "test_vit", "--rate", "0.1", "--json", str(tmp_path / "plan.json")]) == 0
    written = _outline(json.loads((tmp_path / "plan.json").read_text()))
    # lists that are empty for this model: their entries are these dataclasses
    for key, kind in (("left_alone", pathsurgeon.LeftAlone), ("computed_in_full", pathsurgeon.Fallback)):
        assert documented.pop(key) == {field.name: None for field in dataclasses.fields(kind)}
        assert written.pop(key) is None
    assert written["parts"]["branches"] == written["branches"]  # a part's branches: the same entries
    written["parts"]["branches"] = None  # which the README does not spell out a second time
    assert documented == written


# --- the CLI page: the --help of the installed command, so it cannot drift --------------------------------

CLI_START, CLI_END = "<!-- cli-help:start -->", "<!-- cli-help:end -->"


def cli_help_section() -> str:
    """`pathsurgeon --help` and each command's --help, as a terminal of 100 columns shows them."""
    from pathsurgeon import cli

    commands = [choice for action in cli._parser()._actions if isinstance(action, argparse._SubParsersAction)
                for choice in action.choices]
    parts = []
    for arguments in ([], *([command] for command in commands)):
        environment = {**os.environ, "COLUMNS": "100"}
        result = subprocess.run([sys.executable, "-c", "from pathsurgeon.cli import main; main()", *arguments,
                                 "--help"], capture_output=True, text=True, env=environment)
        assert result.returncode == 0, result.stderr
        title = " ".join(["pathsurgeon", *arguments, "--help"])
        parts.append(f"### `{title}`\n\n```text\n{result.stdout.rstrip()}\n```\n")
    return "\n".join(parts)


def _cli_page_with(section: str) -> str:
    text = CLI_PAGE.read_text()
    before, rest = text.split(CLI_START, 1)
    return before + CLI_START + "\n" + section + CLI_END + rest.split(CLI_END, 1)[1]


def test_cli_page_is_what_help_prints():
    assert CLI_PAGE.read_text() == _cli_page_with(cli_help_section()), (
        "docs/reference/cli.md differs from pathsurgeon --help: python tests/test_readme.py --write-cli")


# --- the API page: every public name, through mkdocstrings ---------------------------------------------


def test_api_page_documents_every_public_name():
    entries = set(re.findall(r"^::: (\S+)$", API_PAGE.read_text(), re.M))
    import pathsurgeon.errors as error_module

    errors = {name for name, value in vars(error_module).items()
              if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == error_module.__name__}
    assert "::: pathsurgeon.errors" in ERRORS_PAGE.read_text()
    documented = {entry.removeprefix("pathsurgeon.") for entry in entries} | errors
    assert set(pathsurgeon.__all__) - documented == set()
    # only public names: a module path inside the package would break the build when it moves
    internal = {entry for entry in entries if not entry.startswith(("pathsurgeon.integrations.", "pathsurgeon.errors"))
                and entry.removeprefix("pathsurgeon.") not in pathsurgeon.__all__}
    assert internal == set()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-cli"]:
        sys.exit("usage: python tests/test_readme.py --write-cli")
    CLI_PAGE.write_text(_cli_page_with(cli_help_section()))

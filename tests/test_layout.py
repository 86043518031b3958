"""The package's layout: the command line's words stay in cli.py, and the loading room's imports flow one way."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

from pathsurgeon import cli

PACKAGE = Path(cli.__file__).parent
# Modules whose messages still name an option, each with the change that removes it from this list.
NOT_YET: dict[str, str] = {}  # module -> why it may still name an option
# The loading room, lowest first: a module imports only from the ones before it (in any function too).
LOADING_ROOM = ("untrusted", "weights", "hub", "hf_models", "rebuild", "specs", "checkpoint")


def cli_options() -> set[str]:
    """Every ``--option`` of the parser and of each command's parser."""
    options: set[str] = set()
    parsers = [cli._parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            options.update(option for option in action.option_strings if option.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return options


def strings_of(tree: ast.Module) -> list[str]:
    """The string constants of a module (f-strings' literal parts included), its docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_but_the_command_line_names_one_of_its_options():
    options = cli_options()
    assert {"--model", "--weights", "--allow-missing-keys", "--require-pretrained", "--static"} <= options
    named = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(options))) + r")(?![\w-])")
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.name == "cli.py" or str(file.relative_to(PACKAGE)) in NOT_YET:
            continue
        for text in strings_of(ast.parse(file.read_text())):
            found += [f"{file.relative_to(PACKAGE)}: {match[1]} in {text[:60]!r}" for match in named.finditer(text)]
    assert found == []


def test_the_loading_room_imports_flow_down():
    upward = []
    for position, name in enumerate(LOADING_ROOM):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in LOADING_ROOM:
                if LOADING_ROOM.index(node.module) >= position:
                    upward.append(f"{name} imports {node.module}")
    assert upward == []
    assert all(len((PACKAGE / f"{name}.py").read_text().splitlines()) <= 400 for name in LOADING_ROOM)

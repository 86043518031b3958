"""The distribution is the product: what a wheel and an sdist built from this tree carry.

Every test before this one runs on an editable install, which reads the source tree and so cannot
notice a package the build leaves out (pathsurgeon 0.2's wheel lacked ``pathsurgeon/libraries``). Here
the wheel and the sdist are built from a copy of the tree, with the build backend pyproject.toml names,
and their file lists are held against the tree. Installing them into a clean environment and running the
CLI from outside the repository is ``.ci/install_check.sh``'s job (it needs minutes and the package
index, not a unit test's seconds).
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import pathsurgeon

ROOT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "out", "*.egg-info", "__pycache__",
                               ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis", "site")


def _tree_modules() -> set[str]:
    """The tree's importable files as they must sit in an installed package."""
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "pathsurgeon").rglob("*.py")}
    found |= {f"pathsurgeon/recipes/{p.name}" for p in (ROOT / "recipes").iterdir() if p.suffix in (".py", ".toml")}
    return found | {"pathsurgeon/py.typed"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A wheel and an sdist of a copy of this tree (the build leaves nothing in the working tree)."""
    pytest.importorskip("build", reason="the dev extra installs build")
    work = tmp_path_factory.mktemp("dist")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=_SKIP)
    out = work / "out"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.slow
def test_the_wheel_carries_every_module_and_data_file(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
    missing = sorted(_tree_modules() - names)
    assert not missing, f"the wheel lacks {missing}: the package list in setup.py must find them"
    stray = sorted(n for n in names if not n.startswith(("pathsurgeon/", "pathsurgeon-")))
    assert not stray, f"the wheel installs files outside the package: {stray}"


@pytest.mark.slow
def test_the_wheel_metadata_has_one_version_and_the_license(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(wheel.read(metadata_name))
        licenses = [n for n in wheel.namelist() if "/licenses/" in n]
    assert metadata["Version"] == pathsurgeon.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert [Path(n).name for n in licenses] == ["LICENSE"]
    entry = [line for line in metadata.get_all("Requires-Dist") if line.startswith("torch")]
    assert entry == ["torch>=2.4"]


@pytest.mark.slow
def test_the_sdist_carries_the_package_the_tests_the_examples_and_the_docs(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    wanted = {str(p.relative_to(ROOT)) for folder in ("pathsurgeon", "recipes", "tests", "examples", "docs")
              for p in (ROOT / folder).rglob("*")
              if p.is_file() and not any(part == "__pycache__" or part.startswith(".")
                                         for part in p.relative_to(ROOT).parts)}
    wanted |= {"pyproject.toml", "setup.py", "LICENSE", "CHANGELOG.md", "README.md", "Makefile", "mkdocs.yml"}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}: see MANIFEST.in"


def test_version_is_read_from_one_place():
    from importlib.metadata import version

    from pathsurgeon._version import __version__

    assert pathsurgeon.__version__ == __version__
    assert version("pathsurgeon") == __version__, "reinstall (make test does): the metadata is older than the tree"
    assert "dynamic" in (ROOT / "pyproject.toml").read_text() and "version = " not in (
        (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("[")[0]
    )


def test_the_declared_floors_are_the_ones_ci_installs():
    """pyproject.toml's lower bounds and .ci/floors.txt (what `make test-floors` installs) name the same
    releases, so the floors users are promised are the floors CI tests."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["hf"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        if match and match.group(1) in ("torch", "timm", "transformers"):
            declared[match.group(1)] = match.group(2)
    pinned = dict(re.findall(r"^([a-z]+)==([0-9.]+)$", (ROOT / ".ci" / "floors.txt").read_text(), re.M))
    assert set(declared) == {"torch", "timm", "transformers"}
    for name, floor in declared.items():
        assert pinned[name].startswith(floor), f"{name}: pyproject says >={floor}, CI installs {pinned[name]}"
    assert project["requires-python"] == ">=3.11"

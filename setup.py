"""Which packages ship: everything under ``pathsurgeon/``, found rather than listed by hand (a package
added later cannot be forgotten), plus ``recipes/`` (data the package reads, kept at the top of the
repository) as ``pathsurgeon.recipes``. Everything else is in pyproject.toml; ``tests/test_packaging.py``
builds the wheel and checks that every module of the tree is in it."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["pathsurgeon", "pathsurgeon.*"]), "pathsurgeon.recipes"],
    package_dir={"pathsurgeon.recipes": "recipes"},
)

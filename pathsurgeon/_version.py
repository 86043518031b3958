"""The release number, in one place: ``pathsurgeon.__version__``, ``pathsurgeon --version``, the package
metadata (``[tool.setuptools.dynamic]`` reads it from here) and the manifests ``save`` writes."""

__version__ = "0.3.0"

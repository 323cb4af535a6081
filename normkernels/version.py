"""The package version, in one place: normkernels.__version__ imports it and setup.py reads it as
text (without importing the package, which needs torch)."""
__version__ = "0.1.0"

"""Triton kernels (optional: importing this package requires triton)."""

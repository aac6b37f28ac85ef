"""Triton kernels (imported lazily: triton is optional)."""

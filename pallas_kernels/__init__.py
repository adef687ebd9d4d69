"""Pallas kernels (forward + backward), one folder per op, each importable without a GPU/TPU."""

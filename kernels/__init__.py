"""Numba kernels for dense neural networks: a NumPy reference, CPU (@njit) and CUDA backends."""

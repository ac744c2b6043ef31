"""Bindings to NVIDIA libraries: cuBLAS and cuBLASLt through ctypes, and why no GPU is usable."""

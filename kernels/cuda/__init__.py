"""CuPy twins of ``fastgrad.kernels.cpu`` (same names and signatures).

Imported only when the CUDA device is used; importing fastgrad never needs
CUDA.
"""

"""Compute kernels of fastgrad, shipped as ``fastgrad.kernels``.

``cpu`` holds Numba kernels, ``cuda`` their CuPy twins with the same names and
signatures.  Nothing here validates input: ``fastgrad.ops`` does that before
any kernel runs.
"""

"""Compute kernels of fastgrad, shipped as ``fastgrad.kernels``.

``cpu`` holds Numba kernels, ``cuda`` their CuPy twins with the same names and
signatures.  Nothing here validates input: ``fastgrad.ops`` does that before
any kernel runs.
"""

if __name__ != "fastgrad.kernels":
    # Numba's on-disk cache records the module name; compiling these files
    # under a second name would leave entries the installed package cannot
    # load.  The wheel never installs a top-level ``kernels``.
    raise ImportError("import fastgrad.kernels, not the kernels folder directly")

"""Timing helpers shared by the interleaved-rounds scripts (step_compare,
torch_backend_compare, epilogue_compare, untuned_compare)."""
import time

import numpy as np


def timed(fn, reps):
    """Median wall time of ``reps`` calls of ``fn``, each timed on its own
    (the median shrugs off the slow calls a shared host interleaves)."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return float(np.median(out))

"""Per-call overhead of passing many arrays to one compiled call, and
``fg.Adam`` over (param, grad) pairs against the flat-buffer path (issue #18).

Two ways for ``kernels/cpu/multi_tensor.py`` to receive a list of separate
arrays: a ``numba.typed.List`` of arrays built per call, or int64 arrays of
data addresses turned back into arrays inside the kernel (``numba.carray``).
Both kernels here do the same trivial work (sum of first items) so that the
timing is the overhead of the call and of building its arguments.

Then ``fg.Adam(clip_norm=1.0).step()`` over 64 separate float32 arrays
(pairs, updated in place by the multi-tensor kernel) against the same update
on one flat buffer (a model), interleaved; the issue asks for the pairs to be
within 10 % of the flat path per byte.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/multi_tensor_overhead.py
"""
import time

import numpy as np
from numba import njit
from numba.typed import List

from fastgrad.kernels.cpu.multi_tensor import _view, addresses


@njit(cache=True)
def _first_typed(arrays):
    s = 0.0
    for a in arrays:
        s += a[0]
    return s


@njit(cache=True)
def _first_addr(like, addr, sizes):
    s = 0.0
    for i in range(sizes.shape[0]):
        s += _view(addr[i], sizes[i], like)[0]
    return s


def _best(fn, reps=200):
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main():
    like = np.empty(0, np.float32)
    for n in (10, 100, 1000):
        arrays = [np.ones(7, np.float32) for _ in range(n)]
        sizes = np.full(n, 7, np.int64)

        def typed():
            return _first_typed(List(arrays))

        def addr():
            return _first_addr(like, addresses(arrays), sizes)

        cached = addresses(arrays)

        def addr_cached():
            return _first_addr(like, cached, sizes)

        typed(), addr(), addr_cached()
        reps = 20 if n == 1000 else 200
        t_typed, t_addr, t_cached = _best(typed, reps), _best(addr, reps), _best(addr_cached)
        line = (f"{n:5d} tensors: typed.List {t_typed * 1e6:8.1f} us | addresses taken per call "
                f"{t_addr * 1e6:8.1f} us | addresses kept {t_cached * 1e6:6.1f} us")
        try:
            import torch
            tensors = [torch.ones(7) for _ in range(n)]

            def ptrs():
                return _first_addr(like, np.fromiter((t.data_ptr() for t in tensors), np.int64,
                                                     n), sizes)

            ptrs()
            line += f" | torch data_ptr per call {_best(ptrs, reps) * 1e6:7.1f} us"
        except ImportError:
            pass
        print(line)


def pairs_against_flat(n_params, n_arrays=64, rounds=15, reps=5):
    import fastgrad as fg
    rng = np.random.default_rng(0)
    k = n_params // n_arrays
    ps = [rng.standard_normal(k).astype(np.float32) for _ in range(n_arrays)]
    gs = [rng.standard_normal(k).astype(np.float32) * np.float32(1e-3) for _ in range(n_arrays)]

    class Flat:
        params = np.concatenate(ps)
        grads = np.concatenate(gs)
        layer_offsets = np.arange(n_arrays + 1, dtype=np.int64) * k

    flat = fg.Adam(Flat(), clip_norm=1.0)
    pairs = fg.Adam(list(zip(ps, gs)), clip_norm=1.0)
    flat.step(), pairs.step()
    ratios, times = [], {"flat": [], "pairs": []}
    for _ in range(rounds):
        for name, opt in (("flat", flat), ("pairs", pairs)):
            t0 = time.perf_counter()
            for _ in range(reps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / reps)
        ratios.append(times["pairs"][-1] / times["flat"][-1])
    print(f"{n_params / 1e6:5.1f}M over {n_arrays} arrays: flat {np.median(times['flat']) * 1e3:7.3f} ms"
          f" | pairs in place {np.median(times['pairs']) * 1e3:7.3f} ms | pairs / flat "
          f"{np.median(ratios):.3f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
    for n in (1 << 20, 1 << 24):
        pairs_against_flat(n)

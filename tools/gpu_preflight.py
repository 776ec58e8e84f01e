"""Pre-flight check of a GPU machine, first stage of tools/gpu_session.sh.

    python tools/gpu_preflight.py [--required-only]

In seconds, before anything long starts, it answers "can fastgrad's CUDA
tests and benchmarks run here?", stage by stage, and stops at the first
stage that says no:

1. imports every required dependency and looks up the optional ones (all
   of them, so that every missing one is named at once);
2. finds a GPU (``cupy.cuda.runtime.getDeviceCount()``);
3. finds NVRTC (``cupy.cuda.nvrtc.getVersion()``) and the CUDA headers
   (one CuPy elementwise kernel: CuPy compiles it with NVRTC against them);
4. compiles and launches one small kernel through fastgrad's own loader
   (``fastgrad.kernels.cuda._module``: its source pasting of
   ``common.cuh`` and its ``cupy.RawModule`` options), and checks every
   element it wrote;
5. imports the optional dependencies, which only shrink the session when
   missing or broken (no torch: no PyTorch column in the targets), unless
   ``--required-only``.

The last line is the verdict: ``PREFLIGHT OK ...`` (exit 0) or
``PREFLIGHT FAILED at <stage>: <why>`` (exit 2 dependency, 3 GPU,
4 NVRTC / headers, 5 loader).  On the host emulator
(``PYTHONPATH=tools/cuda_emulator EMU_CUPY=1``) the same checks run against
the emulated CuPy, whose kernels g++ compiles.
"""
import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import time

# (import name, distribution, what it is for).  Required: fastgrad's own
# dependencies, CuPy and what the test suite imports at collection.
REQUIRED = (
    ("numpy", "numpy", "fastgrad"),
    ("scipy", "scipy", "fastgrad (Numba's np.dot calls SciPy's BLAS)"),
    ("numba", "numba", "fastgrad's CPU kernels"),
    ("threadpoolctl", "threadpoolctl", "fastgrad.set_num_threads"),
    ("safetensors", "safetensors", "fastgrad checkpoints"),
    ("cupy", "cupy-cuda13x", "fastgrad's CUDA backend"),
    ("pytest", "pytest", "the cuda tests"),
    ("hypothesis", "hypothesis", "the test suite (tests/test_properties.py)"),
)
# Optional: without them the session runs, smaller.
OPTIONAL = (
    ("xdist", "pytest-xdist", "parallel test workers (else one worker)"),
    ("pytest_timeout", "pytest-timeout", "per-test and session time limits"),
    ("pytest_benchmark", "pytest-benchmark", "the cuda benchmarks stage"),
    ("torch", "torch", "PyTorch parity tests and the step-vs-torch target"),
    ("jax", "jax", "peer comparisons (CPU only here)"),
    ("optax", "optax", "peer comparisons (CPU only here)"),
    ("mpi4py", "mpi4py", "the data-parallel tests"),
)

EXIT = {"dependencies": 2, "gpu": 3, "nvrtc": 4, "loader": 5}

# One grid-stride kernel that uses common.cuh (pasted in by the loader):
# 2 blocks of 128 threads over an odd n, so several blocks and the stride
# loop both run.
PROBE_SOURCE = r'''
template <typename T>
__global__ void fg_preflight(T* out, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = (T)(2 * i + 1);
}
'''
PROBE_NAME = "fg_preflight<float>"
PROBE_N = 1001


class Failed(Exception):
    """A stage said no; ``stage`` picks the exit code."""

    def __init__(self, stage, why):
        super().__init__(why)
        self.stage = stage


def say(msg):
    print(msg, flush=True)


def _version(mod, dist=None):
    if getattr(mod, "__emulated__", False):
        return "emulated"
    v = getattr(mod, "__version__", None)
    if v is None and dist:
        try:
            v = importlib.metadata.version(dist)
        except Exception:
            pass
    return str(v or "?")


def check_imports(required=REQUIRED, optional=OPTIONAL, import_optional=True):
    """Import every dependency; returns the modules imported by name.
    Raises Failed naming every missing required one.  The optional ones
    are only looked up, not imported (torch and jax take seconds), when
    ``import_optional`` is false or a required one is missing."""
    mods, missing = {}, []
    for group, table in (("required", required), ("optional", optional)):
        for name, dist, why in table:
            t = time.perf_counter()
            try:
                if group == "optional" and (missing or not import_optional):
                    if importlib.util.find_spec(name) is None:
                        raise ImportError(f"No module named {name!r}")
                    say(f"  found   {name:16s} (not imported)")
                    continue
                mods[name] = importlib.import_module(name)
            except Exception as exc:         # ImportError, or a broken install
                msg = f"{name} ({dist}; {why}): {type(exc).__name__}: {exc}"
                say(f"  MISSING {group:8s} {msg}")
                if group == "required":
                    missing.append(msg)
                continue
            say(f"  ok      {name:16s} {_version(mods[name], dist):12s} "
                f"{time.perf_counter() - t:5.1f} s")
    if missing:
        raise Failed("dependencies", "missing required dependencies: " + "; ".join(missing))
    return mods


def check_gpu(cp):
    """The number of GPUs (> 0), with what describes the first one."""
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:                 # no driver, driver too old, no device
        raise Failed("gpu", f"no usable GPU: cupy.cuda.runtime.getDeviceCount() raised "
                            f"{type(exc).__name__}: {exc}") from None
    if n < 1:
        raise Failed("gpu", "no GPU visible (getDeviceCount() == 0)")
    rt = cp.cuda.runtime
    info = [f"{n} GPU(s)"]
    # Descriptive only: each guarded, since a missing one must not stop
    # the session (and the emulated CuPy has none of these).
    for label, get in (
            ("name", lambda: rt.getDeviceProperties(0)["name"].decode()),
            ("compute capability", lambda: cp.cuda.Device(0).compute_capability),
            ("driver", lambda: rt.driverGetVersion()),
            ("runtime", lambda: rt.runtimeGetVersion()),
            ("free/total GiB", lambda: "%.1f/%.1f" % tuple(x / 2**30 for x in rt.memGetInfo()))):
        try:
            info.append(f"{label} {get()}")
        except Exception:
            pass
    return ", ".join(info)


def check_nvrtc(cp):
    """NVRTC's version, and one CuPy elementwise kernel run (CuPy compiles
    it with NVRTC against the CUDA headers, e.g. cuda_fp16.h)."""
    if getattr(cp, "__emulated__", False):
        nv = "emulated (g++)"
    else:
        try:
            nv = "NVRTC %d.%d" % cp.cuda.nvrtc.getVersion()
        except Exception as exc:             # libnvrtc not found
            raise Failed("nvrtc", f"NVRTC not usable: cupy.cuda.nvrtc.getVersion() raised "
                                  f"{type(exc).__name__}: {exc}") from None
        try:
            from cuda import pathfinder
            nv += f", CUDA headers {pathfinder.find_nvidia_header_directory('cudart')}"
        except Exception:
            pass
    if getattr(cp, "__emulated__", False):
        return nv       # the emulator offers no CuPy elementwise kernels to probe
    import numpy as np
    try:
        x = cp.arange(PROBE_N, dtype=np.float32)
        got = (x * 2 + 1).get()
    except Exception as exc:
        raise Failed("nvrtc", f"CuPy's own elementwise kernel failed (NVRTC or the CUDA "
                              f"headers): {type(exc).__name__}: {_first_lines(exc)}") from None
    want = np.arange(PROBE_N, dtype=np.float32) * 2 + 1
    if not np.array_equal(got, want):
        raise Failed("nvrtc", "CuPy's elementwise kernel computed wrong values")
    return nv


def check_loader(cp):
    """Compile PROBE_SOURCE (with common.cuh pasted in) through the options
    fastgrad's loader uses, launch it over an odd size, check every element."""
    import numpy as np
    try:
        from fastgrad.kernels.cuda import _module
    except Exception as exc:
        raise Failed("loader", f"import fastgrad.kernels.cuda._module: "
                               f"{type(exc).__name__}: {exc}") from None
    options = tuple(_module._OPTIONS)
    try:
        code = _module.source("common.cuh") + PROBE_SOURCE
        kernel = cp.RawModule(code=code, options=options,
                              name_expressions=[PROBE_NAME]).get_function(PROBE_NAME)
    except Exception as exc:                 # CompileException carries NVRTC's log
        raise Failed("loader", f"compiling through the loader (options {' '.join(options)}) failed: "
                               f"{type(exc).__name__}: {_first_lines(exc)}") from None
    out = cp.full(PROBE_N, np.nan, dtype=np.float32)      # poisoned: every element must be written
    try:
        kernel((2,), (128,), (out, np.int64(PROBE_N)))
        got = out.get()
    except Exception as exc:
        raise Failed("loader", f"launching the probe kernel failed: "
                               f"{type(exc).__name__}: {_first_lines(exc)}") from None
    want = np.arange(PROBE_N, dtype=np.float32) * 2 + 1
    bad = np.flatnonzero(got != want)
    if bad.size:
        raise Failed("loader", f"probe kernel wrote wrong values at {bad.size} of {PROBE_N} "
                               f"elements (first {bad[0]}: {got[bad[0]]}, want {want[bad[0]]})")
    return f"options {' '.join(options)}"


def _first_lines(exc, n=6):
    lines = str(exc).strip().splitlines()
    return " | ".join(lines[:n]) + (" | ..." if len(lines) > n else "")


def _notes(mods):
    """Things that do not stop the session but change what it can show."""
    torch = mods.get("torch")
    if torch is not None:
        try:
            say(f"  torch CUDA: {torch.cuda.is_available()}")
        except Exception as exc:
            say(f"  torch CUDA: {type(exc).__name__}: {exc}")
    say(f"  nvcc: {shutil.which('nvcc') or 'not on PATH (tests that compile .cu with nvcc skip)'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--required-only", action="store_true",
                    help="skip the optional packages (a quick re-check; torch and jax "
                         "take seconds to import)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    say(f"python {sys.version.split()[0]} at {sys.executable}")
    if os.environ.get("EMU_CUPY") == "1":
        say("CuPy: the host emulator (tools/cuda_emulator)")
    try:
        say("-- dependencies")
        mods = check_imports(import_optional=False)
        cp = mods["cupy"]
        say("-- GPU")
        gpu = check_gpu(cp)
        say(f"  {gpu}")
        say("-- NVRTC and CUDA headers")
        nv = check_nvrtc(cp)
        say(f"  {nv}")
        say("-- fastgrad's loader")
        loader = check_loader(cp)
        say(f"  probe kernel compiled, launched and checked ({loader})")
        if not args.required_only:
            # After the GPU stages, which fail far more often: torch and
            # jax take seconds to import.
            say("-- optional dependencies")
            mods.update(check_imports(required=()))
            _notes(mods)
    except Failed as exc:
        say(f"PREFLIGHT FAILED at {exc.stage}: {exc} "
            f"({time.perf_counter() - t0:.1f} s)")
        return EXIT[exc.stage]
    say(f"PREFLIGHT OK ({time.perf_counter() - t0:.1f} s): {gpu}; {nv}; "
        f"cupy {_version(cp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

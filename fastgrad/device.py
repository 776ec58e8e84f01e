"""Device selection: "auto" | "cpu" | "cuda".

The device is chosen once (``set_device`` or the ``FASTGRAD_DEVICE``
environment variable) and each model keeps the device it was built on.
Importing fastgrad never imports CuPy: CUDA is probed only when asked for.
"""
import ctypes
import importlib.util
import os
import sys

import numpy as np

DEVICES = ("cpu", "cuda")
_ENV = "FASTGRAD_DEVICE"
_current = None          # resolved device name, set on first use


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot run here; the message says why."""


def _no_driver_library():
    """Why CUDA cannot run, found without importing CuPy (which takes about
    a second: a cold start of a CPU-only host with CuPy installed paid it for
    the "auto" device): on Linux, the driver's library ``libcuda.so.1``
    does not load.  None when it loads, off Linux, and when ``cupy`` is not
    the installed package (already in ``sys.modules``, or supplied by an
    import hook such as tools/cuda_emulator): CuPy itself is asked then."""
    if not sys.platform.startswith("linux") or "cupy" in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec("cupy")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no usable NVIDIA driver: {exc}"
    return None


def _cuda_problem():
    """None if CUDA can run, else the concrete reason it cannot."""
    problem = _no_driver_library()
    if problem:
        return problem
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'fastgrad[cuda]')"
    except Exception as exc:                       # broken install
        return f"CuPy failed to import: {exc}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:                       # no driver / no libcuda
        return f"no usable NVIDIA driver: {exc}"
    if n < 1:
        return "no NVIDIA GPU is visible"
    return None


def available_devices():
    """Devices that can run here, e.g. ``["cpu"]`` or ``["cpu", "cuda"]``."""
    return ["cpu"] if _cuda_problem() else ["cpu", "cuda"]


def resolve(name):
    """Turn "auto" | "cpu" | "cuda" | None into a device that can run."""
    if name is None:
        return get_device()
    if not isinstance(name, str) or name.lower() not in DEVICES + ("auto",):
        raise ValueError(f"unknown device {name!r}; expected 'auto', 'cpu' or 'cuda'")
    name = name.lower()
    if name == "auto":
        return "cpu" if _cuda_problem() else "cuda"
    if name == "cuda":
        problem = _cuda_problem()
        if problem:
            raise DeviceUnavailableError(f"device 'cuda' is unavailable: {problem}")
    return name


def set_device(name):
    """Set the default device of new models; returns the resolved name."""
    global _current
    _current = resolve(name)
    return _current


def get_device():
    """The default device ("cpu" or "cuda"); from FASTGRAD_DEVICE, else "auto"."""
    global _current
    if _current is None:
        _current = resolve(os.environ.get(_ENV, "auto") or "auto")
    return _current


def set_flush_denormal(mode):
    """Whether the CPU's float32 training kernels flush denormals to zero.

    On (the default, as JAX and TensorFlow on the CPU, and as fastgrad's
    float32 CUDA kernels always do): the float32 training step,
    ``run_epoch``, the layer path's forward and backward and the
    optimizer's update of its flat buffers (not of ``(param, grad)`` pairs
    updated in place, which keep PyTorch's semantics, as
    ``fastgrad.torch``) set the x86 FTZ and DAZ bits while they run, on
    their own threads and the shared BLAS pool's (``share_blas_pool``),
    and restore the caller's on return: values below the smallest normal
    float32 (1.2e-38) read and are written as zero there.  Without the
    shared pool, a ``TrainStep`` step or epoch whose GEMMs are large enough
    for OpenBLAS to split gives OpenBLAS's own workers the mode for its span
    and clears it on return (not with ``FASTGRAD_PASS_TEAM=0``: there the
    workers' share of a GEMM keeps denormals).  On Intel cores each
    denormal operation costs a microcode assist of ~100 cycles, and a
    confident model's underflowing probabilities and gradients made whole
    steps up to 6x slower (bench/RESULTS.md "Denormals").  Off: IEEE
    gradual underflow, PyTorch's default.  float64, NumPy, ``fastgrad.ops``
    and anything else outside those kernels are not affected.  Returns
    whether this CPU supports it (x86-64), as ``torch.set_flush_denormal``
    does.
    """
    from .kernels import denormals
    return denormals.set_flush(bool(mode))


def get_flush_denormal():
    """Whether the CPU training kernels flush denormals (see
    :func:`set_flush_denormal`)."""
    from .kernels import denormals
    return denormals.flushing()


_COPIES_ENV = "FASTGRAD_KERNEL_COPIES"
KERNEL_COPIES = ("model", "shared")


def kernel_copies():
    """How CPU models get their compiled kernels, from FASTGRAD_KERNEL_COPIES:
    "model" (the default) compiles a copy for each model's activations,
    update rule and loss alone, so a cold first step compiles only what it
    uses; "shared" gives every model the one package serving every code, so
    a process that builds many different models (a test suite, a sweep)
    compiles once."""
    mode = os.environ.get(_COPIES_ENV, "") or "model"
    if mode not in KERNEL_COPIES:
        raise ValueError(f"{_COPIES_ENV}={mode!r}: expected one of {KERNEL_COPIES}")
    return mode


def array_module(device):
    """numpy for "cpu", cupy for "cuda"."""
    if device == "cuda":
        import cupy
        return cupy
    return np


def device_of(array):
    """"cuda" for CuPy arrays (and DLPack CUDA tensors), "cpu" otherwise."""
    mod = type(array).__module__
    if mod.startswith("cupy"):
        return "cuda"
    dev = getattr(array, "__dlpack_device__", None)
    if dev is not None and not isinstance(array, np.ndarray):
        try:
            kind, _ = dev()
        except Exception:
            return "cpu"
        return "cuda" if int(kind) in (2, 3, 13) else "cpu"   # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
    return "cpu"


def is_host_array(array):
    """True for an array in host memory (NumPy, lists, CPU tensors)."""
    return device_of(array) == "cpu"


def to_numpy(array):
    """A NumPy view or copy of ``array`` (copies device arrays to the host)."""
    if device_of(array) == "cuda" and hasattr(array, "get"):
        return array.get()
    return np.asarray(array)


def kernels(device):
    """The kernel module of ``device``: fastgrad.kernels.cpu or .cuda."""
    if device == "cuda":
        from .kernels import cuda
        return cuda
    from .kernels import cpu
    return cpu

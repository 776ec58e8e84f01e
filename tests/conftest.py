"""Shared fixtures of the fastgrad test suite.

* ``rng``: a fresh ``numpy.random.Generator`` per test.  Its seed combines a
  per-session seed (random, or ``FASTGRAD_TEST_SEED`` to replay a run) with a
  hash of the test's node id, so every test draws different inputs, every run
  draws new ones, and a failure prints the seed that reproduces it.
* ``device``: every device fastgrad knows; GPU cases carry the ``cuda`` marker
  and are skipped (with the reason) where CUDA cannot run.
* helpers: ``to_numpy``, ``assert_close`` (llm.c style ``atol + rtol*|ref|``
  with tolerances scaled by dtype), ``dyadic`` (inputs whose GEMM is exact in
  float32, so the sign of a pre-activation is the same in every precision).
"""
import os
import secrets
import subprocess
import sys
import zlib

import numpy as np
import pytest

# Tests that do not name a device test the CPU; device-parametrized tests
# name theirs.  Without this, "auto" would build CUDA models in CPU-only
# tests on a GPU machine.  An explicit FASTGRAD_DEVICE still wins.
os.environ.setdefault("FASTGRAD_DEVICE", "cpu")
# The suite builds hundreds of different models: one shared kernel package
# compiles once, where per-model copies compiled ~20 minutes more on a cold
# cache.  The copies are tested where they are asked for (``per_model_copies``).
os.environ.setdefault("FASTGRAD_KERNEL_COPIES", "shared")

import fastgrad  # noqa: E402
from fastgrad import device as fg_device  # noqa: E402

# Every built-in activation, from the registry (the one list).
ACTIVATIONS = tuple(spec.name for spec in fastgrad.registry.specs() if spec.builtin)
# Every optimizer update rule (kernels/spec.py UPDATE_RULES, in code order),
# its fastgrad.optim class and the name of the torch.optim class it mirrors.
RULES = tuple(fastgrad.kernels.spec.RULES)
OPTIMIZERS = fastgrad.optim.optimizer_classes()
TORCH_OPTIMIZERS = {r.name: r.torch.cls for r in fastgrad.kernels.spec.UPDATE_RULES if r.torch}
LOSSES = ("softmax_cross_entropy", "mse", "bce_with_logits")
DTYPES = (np.float32, np.float64)
WIDTHS = (1, 3, 17, 129, 1000)

# Relative tolerance per dtype.  float64 kernels are libm-exact (errors are
# GEMM / summation rounding); float32 kernels use polynomial approximations
# (tanh max abs error ~4e-7, exp ~2 ulp) plus float32 GEMM rounding.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

_SESSION_SEED = int(os.environ.get("FASTGRAD_TEST_SEED", secrets.randbits(32)))


def pytest_report_header(config):
    return f"fastgrad test seed: FASTGRAD_TEST_SEED={_SESSION_SEED}"


def _cuda_reason():
    return fg_device._cuda_problem()


def pytest_collection_modifyitems(config, items):
    """Skip every test marked ``cuda`` where CUDA cannot run, saying why."""
    reason = None
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            if reason is None:
                reason = _cuda_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"no CUDA here: {reason}"))


@pytest.fixture
def rng(request):
    seed = (_SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0xFFFFFFFF
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append((
                "fastgrad seed",
                f"rng seed {seeds[0]}; replay the whole run with "
                f"FASTGRAD_TEST_SEED={_SESSION_SEED}"))


def _device_params():
    params = []
    for name in fg_device.DEVICES:
        marks = [pytest.mark.cuda] if name == "cuda" else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_device_params())
def device(request):
    """A device name; "cuda" is skipped unless fastgrad.available_devices() has it."""
    if request.param not in fastgrad.available_devices():
        pytest.skip(f"device {request.param!r} unavailable: {_cuda_reason()}")
    return request.param


@pytest.fixture
def cp():
    """CuPy, for tests that need a GPU (skipped without one)."""
    cupy = pytest.importorskip("cupy")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:                      # no driver
        pytest.skip(f"no usable CUDA driver: {exc}")
    if n < 1:
        pytest.skip("no NVIDIA GPU visible")
    return cupy


@pytest.fixture
def cuda_be(cp):
    """fastgrad's CUDA backend (needs ``cp``): tests reach device arrays
    through its ``to_device`` / ``to_host`` / ``alloc``, not CuPy at large."""
    return fastgrad.backend.backend_for("cuda")


@pytest.fixture
def kc(cp):
    """fastgrad.kernels.cuda (needs ``cp``)."""
    import fastgrad.kernels.cuda as kcuda
    return kcuda


@pytest.fixture
def xp(device):
    """The array module of ``device`` (numpy or cupy)."""
    return fg_device.array_module(device)


def to_numpy(a):
    """A NumPy copy/view of a NumPy or CuPy array (None stays None)."""
    if a is None:
        return None
    return fastgrad.backend.backend_of(a).to_host(a)


def rtol_of(dtype):
    return RTOL[np.dtype(dtype)]


def assert_close(got, ref, dtype, rtol=None, atol=None, what=""):
    """``|got - ref| <= atol + rtol * |ref|`` elementwise (NaN must match NaN).

    By default ``rtol`` is the dtype's tolerance and ``atol`` is ``rtol``
    times the largest ``|ref|`` (rounding in sums and GEMMs is relative to
    the size of the terms, not of a result that cancels to near zero).
    """
    got = np.atleast_1d(np.asarray(to_numpy(got), dtype=np.float64))
    ref = np.atleast_1d(np.asarray(ref, dtype=np.float64))
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    if rtol is None:
        rtol = rtol_of(dtype)
    if atol is None:
        finite = ref[np.isfinite(ref)]
        scale = float(np.max(np.abs(finite))) if finite.size else 1.0
        atol = rtol * (scale if scale > 0 else 1.0)
    nan_got, nan_ref = np.isnan(got), np.isnan(ref)
    assert np.array_equal(nan_got, nan_ref), f"{what}: NaN pattern differs from the reference"
    ok = nan_ref | (got == ref) | (np.abs(got - ref) <= atol + rtol * np.abs(ref))
    if not ok.all():
        bad = np.argwhere(~ok)
        idx = tuple(bad[0])
        err = np.abs(got - ref)
        err[~np.isfinite(err)] = np.inf
        raise AssertionError(
            f"{what}: {len(bad)} of {ok.size} elements off (dtype {np.dtype(dtype).name}, "
            f"atol {atol:.3g}, rtol {rtol:.3g}); first at {idx}: got {got[idx]!r}, "
            f"reference {ref[idx]!r}; max abs err {np.max(err[~ok]):.3g}")


def dyadic(rng, shape, dtype, scale=1.0):
    """Random values k / 16 * 2**-e (|k| <= 16), ``scale`` rounded to a power of 2.

    Products and sums of up to ~1e5 of them are exact in float32, so a GEMM
    gives the same ``x @ W`` in float32, float64 and the reference, and a
    ReLU's branch (the sign of z) never depends on rounding.
    """
    p = 2.0 ** np.round(np.log2(scale))
    return (rng.integers(-16, 17, size=shape) / 16.0 * p).astype(dtype)


def dense_inputs(rng, batch, n_in, n_out, dtype):
    """x, W (dyadic, exact GEMM), b (continuous) for a dense layer, as NumPy."""
    x = dyadic(rng, (batch, n_in), dtype, scale=2.0)
    W = dyadic(rng, (n_in, n_out), dtype, scale=2.0 / np.sqrt(n_in))
    b = rng.uniform(-1.0, 1.0, n_out).astype(dtype)
    return x, W, b


def torch_activation(name, alpha=None):
    """The torch module of activation ``name`` (its registry twin), with
    ``alpha`` (default: the activation's own)."""
    import torch
    twin = fastgrad.registry.get(name).torch
    kwargs = dict(twin.kwargs)
    if twin.alpha is not None:
        kwargs[twin.alpha] = fastgrad.registry.get(name).alpha if alpha is None else alpha
    return getattr(torch.nn, twin.module)(**kwargs)


def loss_targets(loss, rng, batch, n_out):
    """Random targets of ``loss``: class labels, 0/1 targets, or reals."""
    if loss == "softmax_cross_entropy":
        return rng.integers(0, n_out, batch)
    if loss == "bce_with_logits":
        return (rng.random((batch, n_out)) > 0.5).astype(np.float64)
    return rng.standard_normal((batch, n_out))


@pytest.fixture
def per_model_copies(monkeypatch):
    """Models built in the test get kernel copies compiled for their own
    activations, rule and loss (fastgrad's default outside the suite)."""
    monkeypatch.setenv("FASTGRAD_KERNEL_COPIES", "model")


def run_without(modules, code, timeout=300, **kw):
    """Run ``code`` in a fresh interpreter in which ``modules`` cannot be
    imported (``sys.modules[name] = None``): fastgrad as a user without
    that extra meets it.  Returns the CompletedProcess (text output)."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=timeout, **kw)

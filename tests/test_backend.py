"""The backend seam: one object per device, chosen once, and its read-back.

Models, optimizers and TrainSteps hold their device's backend
(``fastgrad.backend``) and never test the device string; the read-back is
a value on the CPU and a pending result on CUDA that waits only when read.
"""
import ast
import inspect
import pathlib

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import backend as fb
from fastgrad import device as fg_device
from fastgrad.errors import NonFiniteGradientError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model_step(device, dtype="float64", **opt_kw):
    model = fg.MLP([5, 7, 3], activation="tanh", dtype=dtype, device=device, seed=3)
    opt = fg.Adam(model, lr=1e-2, **opt_kw)
    return model, opt, fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)


def _batch(rng, B=9):
    return rng.standard_normal((B, 5)), rng.integers(0, 3, B)


def test_one_backend_per_device(device):
    be = fb.backend_for(device)
    assert be.name == device
    assert fb.backend_for(device) is be
    assert fb.backend_for(device.upper()) is be          # resolved, then the same object
    assert fb.backend_for(be) is be
    model, opt, step = _model_step(device)
    assert model.backend is be and opt.backend is be and step._backend is be
    assert fb.backend_of(model.params) is be
    assert model.device == opt.device == device
    assert isinstance(model.params, be.xp.ndarray)


def test_backend_chosen_once_at_construction(monkeypatch):
    """A model keeps the backend it was built with when the default device changes."""
    monkeypatch.setattr(fg_device, "_current", None)
    model = fg.MLP([3, 2], device="cpu")
    calls = []
    real = fg_device.resolve
    monkeypatch.setattr(fg_device, "resolve", lambda name: calls.append(name) or real(name))
    opt = fg.SGD(model, lr=0.1)
    step = fg.TrainStep(model, fg.MSE(), opt)
    step(np.ones((4, 3)), np.zeros((4, 2)))
    assert calls == []             # no device probe after the model was built
    assert opt.backend is model.backend is fb.backend_for("cpu")


def test_device_strings_are_read_only(device):
    model, opt, _ = _model_step(device)
    with pytest.raises(AttributeError):
        model.device = "cpu"
    with pytest.raises(AttributeError):
        opt.device = "cpu"
    with pytest.raises(AttributeError):
        model.backend = None


def test_unknown_device_raises():
    with pytest.raises(ValueError, match="unknown device"):
        fb.backend_for("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        fg.MLP([3, 2], device="tpu")


def test_cpu_backend_arrays_and_predicates():
    be = fb.backend_for("cpu")
    assert be.xp is np
    assert be.holds(np.zeros(3)) is False and not be.needs_staging(np.zeros(3))
    assert be.is_array(np.zeros(3)) and not be.is_array([1.0])
    ro = np.zeros(3)
    ro.flags.writeable = False
    assert be.writeable(np.zeros(3)) and not be.writeable(ro)
    assert be.skip_known_on_host and be.compiled_epochs and be.fuses_epilogue
    assert not be.graphs_steps and not be.loss_in_record
    loss = be.loss_result(np.float32(1.5))
    assert type(loss) is float and loss == 1.5
    assert be.step_workspace(4, np.array([5, 3]), np.array([0, 18]), 0, np.float32,
                             None) is None


def test_cpu_readback_is_a_value(rng):
    """On the CPU every update's StepStats is on the host when the call returns."""
    model, opt, step = _model_step("cpu")
    x, y = _batch(rng)
    for k in range(1, 4):
        loss = step(x, y)
        assert type(loss) is float
        assert step.stats._values is not None and step.stats.ready
        assert step.stats.step == k == opt.step_count
    stats = opt.step()
    assert stats.ready and stats.step == 4


def test_cpu_readback_books_skips_and_raises(rng):
    model, opt, step = _model_step("cpu")
    x, y = _batch(rng)
    step.gradients(x, y)
    model.grads[0] = np.nan
    before = model.params.copy()
    st = opt.step()
    assert st.skipped and st.ready and opt.n_skipped == 1 and opt.step_count == 0
    assert np.array_equal(model.params, before)
    opt.skip_nonfinite = False
    with pytest.raises(NonFiniteGradientError):
        opt.step()


@pytest.mark.cuda
def test_cuda_readback_waits_only_when_read(rng):
    """On CUDA a step leaves its StepStats pending (no host wait) and its
    loss a 0-d device array; reading a field fills it from the record."""
    model, opt, step = _model_step("cuda")
    be = model.backend
    assert not be.skip_known_on_host and be.loss_in_record and be.graphs_steps
    x, y = _batch(rng)
    loss = step(x, y)
    assert isinstance(loss, be.xp.ndarray) and loss.shape == () and loss.dtype == np.float64
    stats = step.stats
    assert stats._values is None                 # pending: nothing was read back
    assert len(opt._records.queue) == 1
    assert stats.step == 1                       # reading waits and fills it
    assert stats._values is not None and not opt._records.queue
    assert stats._loss == pytest.approx(float(loss))
    # the update's record and the host agree
    host = fg.MLP([5, 7, 3], activation="tanh", dtype="float64", device="cpu", seed=3)
    hopt = fg.Adam(host, lr=1e-2)
    hloss = fg.TrainStep(host, fg.SoftmaxCrossEntropy(), hopt)(x, y)
    assert float(loss) == pytest.approx(hloss, rel=1e-12)
    assert stats.grad_norm == pytest.approx(hopt.last_stats.grad_norm, rel=1e-10)


@pytest.mark.cuda
def test_cuda_readback_of_opt_step_is_pending(rng):
    model, opt, _ = _model_step("cuda")
    model.grads[...] = model.backend.xp.asarray(rng.standard_normal(model.n_params))
    st = opt.step()
    assert st._values is None
    assert opt.step_count == 1 and st._values is not None     # step_count settles
    st2 = opt.step()
    assert st2.step == 2 and not st2.skipped


def _device_string_tests(path):
    """Comparisons with "cpu"/"cuda" string literals in a module's code."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left] + node.comparators
            if any(isinstance(o, ast.Constant) and o.value in ("cpu", "cuda") for o in operands):
                found.append(node.lineno)
    return found


@pytest.mark.parametrize("module", ["step.py", "optim.py", "layers.py", "ops.py",
                                    "distributed.py", "io.py", "interop.py", "health.py"])
def test_callers_never_test_the_device_string(module):
    """The device's differences live in fastgrad/backend.py: the modules that
    hold a backend compare no device name."""
    assert _device_string_tests(ROOT / "fastgrad" / module) == []


def test_the_scan_finds_a_device_test(tmp_path):
    p = tmp_path / "m.py"
    p.write_text('def f(m):\n    return 1 if m.device == "cuda" else 0\n')
    assert _device_string_tests(p) == [2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_array_helpers_round_trip(device, rng, dtype):
    """to_device / to_host / alloc: the same names on every backend, the
    array on the backend's device, values and dtype kept, C-contiguous."""
    be = fb.backend_for(device)
    host = (rng.standard_normal((7, 5)) * 100).astype(dtype)
    dev = be.to_device(host[:, ::2])                     # a strided host view
    assert fg_device.device_of(dev) == device and be.is_array(dev)
    assert dev.flags.c_contiguous and dev.dtype == dtype and dev.shape == (7, 3)
    back = be.to_host(dev)
    assert isinstance(back, np.ndarray) and back.dtype == dtype
    np.testing.assert_array_equal(back, host[:, ::2])
    assert be.to_device(dev) is dev                      # already there: no copy
    converted = be.to_device(host, dtype=np.float64)
    assert converted.dtype == np.float64
    np.testing.assert_array_equal(be.to_host(converted), host.astype(np.float64))
    np.testing.assert_array_equal(be.to_host(be.to_device([1.5, -2.0])), [1.5, -2.0])
    full = be.alloc((3, 4), dtype, fill=7)
    assert fg_device.device_of(full) == device and full.dtype == dtype
    np.testing.assert_array_equal(be.to_host(full), np.full((3, 4), 7, dtype))
    empty = be.alloc(11, dtype)
    assert empty.shape == (11,) and empty.dtype == dtype and be.is_array(empty)
    with pytest.raises(TypeError, match="scalar"):
        be.alloc(3, dtype, fill=np.ones(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32])
def test_add_into_and_gather_rows_match_numpy(device, rng, dtype):
    """The backend's array operations (CUDA: kernels/cuda/arrays.py) against
    NumPy on fresh odd sizes: ``dst += src`` in place, and the row gather
    of a batch (with repeats, 1-D and 2-D rows)."""
    be = fb.backend_for(device)
    n, m = int(rng.integers(1, 40)), int(rng.integers(1, 9))
    a = (rng.standard_normal((n, m)) * 50).astype(dtype)
    b = (rng.standard_normal((n, m)) * 50).astype(dtype)
    dst = be.to_device(a.copy())            # (on the CPU to_device returns a itself)
    assert be.add_into(dst, be.to_device(b)) is dst
    np.testing.assert_array_equal(be.to_host(dst), a + b)
    idx = rng.integers(0, n, int(rng.integers(1, 2 * n + 2)))
    for src in (a, a[:, 0].copy()):
        out = be.alloc((idx.size,) + src.shape[1:], dtype)
        got = be.gather_rows(be.to_device(src), idx, out)
        assert got is out
        np.testing.assert_array_equal(be.to_host(out), src[idx])


def test_gatherable_keeps_values_and_feeds_gather_rows(device, rng):
    """A dataset's labels or targets in any dtype become a source the row
    gather takes (values kept; on CUDA uint8/bool labels as int64, float16
    targets as the model's dtype), so fit and run_epoch gather them."""
    be = fb.backend_for(device)
    idx = np.array([3, 0, 3, 1], np.int64)
    for host, dtype in ((rng.integers(0, 9, 6).astype(np.uint8), np.float32),
                        (rng.integers(0, 2, 6).astype(bool), np.float32),
                        (rng.standard_normal((6, 2)).astype(np.float16), np.float64),
                        (rng.integers(0, 9, 6).astype(np.int32), np.float32)):
        src = be.gatherable(be.to_device(host), dtype)
        out = be.alloc((idx.size,) + src.shape[1:], src.dtype)
        be.gather_rows(src, idx, out)
        np.testing.assert_array_equal(be.to_host(out), host[idx].astype(src.dtype))


@pytest.mark.cuda
def test_cuda_array_kernels_check_and_select(cuda_be, rng):
    """copy_into, copy_if on a device flag (neither reads back), and the
    refusals: mixed dtypes, other shapes, an unsupported dtype, a host idx;
    an index outside the source leaves its row alone (no read out of bounds)."""
    from fastgrad.kernels.cuda import arrays
    be = cuda_be
    a, b = rng.standard_normal(13), rng.standard_normal(13)
    dst, src = be.to_device(a), be.to_device(b)
    flag = be.to_device(np.zeros(1))
    arrays.copy_if(dst, src, flag)
    np.testing.assert_array_equal(be.to_host(dst), a)           # flag 0: untouched
    arrays.copy_if(dst, src, be.to_device(np.array([1.0])))
    np.testing.assert_array_equal(be.to_host(dst), b)
    dst = be.to_device(a)
    arrays.copy_into(dst, src)
    np.testing.assert_array_equal(be.to_host(dst), b)
    with pytest.raises(TypeError, match="one dtype"):
        arrays.add_into(dst, be.to_device(b.astype(np.float32)))
    with pytest.raises(ValueError, match="shapes"):
        arrays.add_into(dst, be.to_device(b[:5]))
    with pytest.raises(TypeError, match="take"):
        arrays.add_into(be.alloc(3, np.uint8), be.alloc(3, np.uint8))
    with pytest.raises(TypeError, match="idx"):
        arrays.gather_rows(src, np.arange(3), be.alloc(3, np.float64))
    out = be.to_device(np.full(3, -7.0))
    arrays.gather_rows(src, be.to_device(np.array([2, 13, -1])), out)
    np.testing.assert_array_equal(be.to_host(out), [b[2], -7.0, -7.0])


@pytest.mark.cuda
def test_cpu_array_helpers_refuse_cuda_arrays(cp):
    be = fb.backend_for("cpu")
    dev = cp.zeros(3)
    with pytest.raises(TypeError, match="CUDA array"):
        be.to_device(dev)
    with pytest.raises(TypeError, match="CUDA array"):
        be.to_host(dev)


@pytest.mark.cuda
def test_cpu_and_cuda_kernels_are_twins(kc):
    """Both kernel packages export the same names, and each CUDA kernel
    takes its CPU twin's parameters first, in order, adding only defaulted
    ones (the scratch a device needs: ``work``, ``out``, ``ws``, ...)."""
    import fastgrad.kernels.cpu as kcpu

    assert sorted(kcpu.__all__) == sorted(kc.__all__)
    for name in kcpu.__all__:
        cpu, cuda = getattr(kcpu, name), getattr(kc, name)
        if not callable(cuda):
            assert cuda == cpu, name                 # the tables: CODES, NEEDS_Z, ...
            continue
        _assert_twin_signature(name, cpu, cuda)


def _assert_twin_signature(name, cpu, cuda):
    import inspect
    want = list(inspect.signature(getattr(cpu, "py_func", cpu)).parameters)
    got = list(inspect.signature(cuda).parameters.values())
    assert [p.name for p in got[:len(want)]] == want, name
    extra = [p.name for p in got[len(want):] if p.default is inspect.Parameter.empty]
    assert not extra, f"{name}: CUDA-only parameters without a default: {extra}"


@pytest.mark.cuda
def test_cpu_and_cuda_step_drivers_are_twins(kc):
    """One step driver per device, called alike: the CUDA driver takes the
    CPU driver's parameters, step plan included, first and in order, and
    adds only defaulted keywords (``ws``, ``gemm``, ``counter``,
    ``commit``); both read the one plan of kernels/layout.py."""
    import importlib

    from fastgrad.kernels import layout
    from fastgrad.kernels.cpu import step as cpu_step
    cuda_step = importlib.import_module(kc.__name__ + ".step")
    for name in ("forward", "backward", "forward_backward", "train_step"):
        _assert_twin_signature(name, getattr(cpu_step, name), getattr(cuda_step, name))
    # the CPU's adds its pass team's members to the one plan (kernels/cpu/pass_team.py)
    assert cuda_step.step_plan is layout.step_plan
    assert inspect.signature(cpu_step.step_plan) == inspect.signature(layout.step_plan)
    assert cuda_step.SERVED_FEATURES == layout.FEATURES
    # the former epilogue-step modules are that driver under their old names
    blocks = importlib.import_module(kc.__name__ + ".step_blocks")
    assert blocks.train_step_blocks is cuda_step.train_step
    assert blocks.forward_backward_blocks is cuda_step.forward_backward

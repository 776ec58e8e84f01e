"""Bad input: every public entry checks before any kernel runs (DESIGN.md,
"Errors and bad input"); what can be converted safely gives the same result
as the clean input."""
import re

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import ops

from conftest import to_numpy


def _dense(n_in=4, n_out=3, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((5, n_in)).astype(dtype),
            rng.standard_normal((n_in, n_out)).astype(dtype), np.zeros(n_out, dtype))


# --- shapes ----------------------------------------------------------------------

def test_dense_forward_wrong_x_width_names_both_shapes():
    x, W, b = _dense()
    with pytest.raises(ValueError, match=re.escape("expected shape (*, 4), got (5, 6)")):
        ops.dense_forward(np.zeros((5, 6), np.float32), W, b)


@pytest.mark.parametrize("bad", [np.zeros(4), np.zeros((2, 5, 4))])
def test_dense_forward_wrong_x_ndim(bad):
    _, W, b = _dense()
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 4\), got \("):
        ops.dense_forward(bad, W, b)


def test_dense_forward_wrong_bias_and_weight_shapes():
    x, W, _ = _dense()
    with pytest.raises(ValueError, match=re.escape("b: expected shape (3), got (4,)")):
        ops.dense_forward(x, W, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=re.escape("W: expected a 2-D array, got shape (12,)")):
        ops.dense_forward(x, W.ravel(), np.zeros(3, np.float32))


def test_dense_forward_empty_batch():
    _, W, b = _dense()
    with pytest.raises(ValueError, match="empty"):
        ops.dense_forward(np.zeros((0, 4), np.float32), W, b)


def test_dense_backward_wrong_shapes():
    x, W, b = _dense()
    a, z = ops.dense_forward(x, W, b, "gelu")
    with pytest.raises(ValueError, match=re.escape("da: expected shape (5, 3), got (5, 2)")):
        ops.dense_backward(x, W, a, z, np.zeros((5, 2), np.float32), "gelu")
    with pytest.raises(ValueError, match=re.escape("a: expected shape (5, 3), got (4, 3)")):
        ops.dense_backward(x, W, a[:4], z, np.zeros((5, 3), np.float32), "gelu")
    with pytest.raises(ValueError, match="needs z"):
        ops.dense_backward(x, W, a, None, np.zeros((5, 3), np.float32), "gelu")


def test_model_wrong_input_and_dy_shapes():
    model = fg.MLP([4, 5, 3])
    with pytest.raises(ValueError, match=re.escape("expected shape (*, 4), got (2, 5)")):
        model.forward(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=re.escape("got (4,)")):
        model.predict(np.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        model.forward(np.zeros((0, 4)))
    model.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=re.escape("dy: expected shape (2, 3), got (2, 4)")):
        model.backward(np.zeros((2, 4)))


@pytest.mark.parametrize("sizes", [[4, 0, 3], [0, 3], [4, -1], [4, 2.5], [4, True], [4], []])
def test_mlp_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        fg.MLP(sizes)


def test_dense_zero_width_and_mismatched_stack():
    with pytest.raises(ValueError, match="n_in must be a positive integer, got 0"):
        fg.Dense(0, 3)
    with pytest.raises(ValueError, match="n_out must be a positive integer, got -2"):
        fg.Dense(3, -2)
    with pytest.raises(ValueError, match="layer 1 expects 4 inputs but layer 0 gives 5"):
        fg.Sequential([fg.Dense(3, 5), fg.Dense(4, 2)])
    with pytest.raises(ValueError, match="at least one layer"):
        fg.Sequential([])
    with pytest.raises(TypeError, match="expected fastgrad.Dense"):
        fg.Sequential([fg.Dense(3, 5), "relu"])
    d = fg.Dense(3, 3)
    with pytest.raises(ValueError, match="twice"):
        fg.Sequential([d, d])
    fg.Sequential([d])
    with pytest.raises(ValueError, match="already belongs"):
        fg.Sequential([d])


# --- names -------------------------------------------------------------------------

def test_unknown_activation_names_given_and_expected():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; expected one of \[.*'gelu'"):
        fg.MLP([3, 2], activation="swish")
    with pytest.raises(ValueError, match="unknown activation 'Relu'"):
        fg.Dense(3, 2, activation="Relu")
    x, W, b = _dense()
    with pytest.raises(ValueError, match="unknown activation"):
        ops.dense_forward(x, W, b, "softmax")
    with pytest.raises(ValueError, match="unknown activation"):
        ops.activation_forward(x, 3)


@pytest.mark.parametrize("alpha", [-0.1, np.nan, np.inf])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        fg.Dense(3, 2, activation="leaky_relu", alpha=alpha)


def test_unknown_initializer():
    with pytest.raises(ValueError, match=r"unknown initializer 'glorot'; expected one of \[.*'he_normal'"):
        fg.MLP([3, 2], init="glorot")


# --- labels --------------------------------------------------------------------------

LOGITS = np.zeros((3, 4), np.float32)


@pytest.mark.parametrize("labels,match", [
    ([0, 1, 4], re.escape("must lie in [0, 4), got min 0, max 4")),
    ([0, -1, 2], re.escape("must lie in [0, 4), got min -1, max 2")),
    ([0, 1], re.escape("labels: expected shape (3,), got (2,)")),
    ([[0], [1], [2]], re.escape("labels: expected shape (3,), got (3, 1)")),
])
def test_bad_labels_value_error(labels, match):
    with pytest.raises(ValueError, match=match):
        ops.softmax_cross_entropy(LOGITS, np.asarray(labels))
    with pytest.raises(ValueError, match=match):
        fg.SoftmaxCrossEntropy()(LOGITS, np.asarray(labels))


def test_labels_range_is_checked_alike_on_every_path(rng):
    """int64 C-contiguous labels take one reduction for their range (a
    training loop's hot path), other dtypes and strided labels NumPy's min
    and max: the same message wherever the bad label sits, and a step
    refuses the batch before it changes anything."""
    n_classes = 7
    for where in (0, 51, 99):
        for bad in (-1, n_classes, -2**62, 2**62):
            labels = rng.integers(0, n_classes, 100)
            labels[where] = bad
            lo, hi = min(labels.min(), bad), max(labels.max(), bad)
            match = re.escape(f"must lie in [0, {n_classes}), got min {lo}, max {hi}")
            strided = np.repeat(labels, 2)[::2]
            readonly = labels.copy()
            readonly.flags.writeable = False
            for form in (labels, labels.astype(np.int32) if abs(bad) < 2**31 else labels,
                         strided, readonly):
                with pytest.raises(ValueError, match=match):
                    ops.as_labels(form, 100, n_classes)
    good = rng.integers(0, n_classes, 100)
    assert ops.as_labels(good, 100, n_classes) is good
    good[[0, -1]] = 0, n_classes - 1
    np.testing.assert_array_equal(ops.as_labels(good.astype(np.uint8), 100, n_classes), good)
    model = fg.MLP([3, n_classes], seed=0)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=0.1))
    x = rng.standard_normal((100, 3)).astype(np.float32)
    before = model.params.copy()
    bad = good.copy()
    bad[42] = n_classes
    with pytest.raises(ValueError, match=re.escape(f"must lie in [0, {n_classes})")):
        step(x, bad)
    np.testing.assert_array_equal(model.params, before)
    assert step.opt.step_count == 0


@pytest.mark.parametrize("labels", [np.array([0.0, 1.5, 2.0]), np.array([0.0, np.nan, 1.0]),
                                    np.array(["0", "1", "2"]), np.array([0, 1, 2], complex)])
def test_non_integral_labels_type_error(labels):
    with pytest.raises(TypeError, match="labels: expected integer class indices, got dtype"):
        ops.softmax_cross_entropy(LOGITS, labels)


@pytest.mark.parametrize("labels", [np.array([1, 2**64 - 100, 3], np.uint64),
                                    np.array([1, 2**63, 3], np.uint64),
                                    np.array([1.0, 1e30, 3.0]), np.array([1.0, -1e30, 3.0])])
def test_labels_beyond_int64_are_refused_not_wrapped(labels):
    """A cast to int64 wraps them: 2**64 - 100 became ignore_index -100 and
    its row was silently skipped."""
    for kw in ({}, {"ignore_index": -100, "reduction": "sum"}):
        with pytest.raises(ValueError, match=re.escape("must lie in [0, 4)")):
            ops.softmax_cross_entropy(LOGITS, labels, **kw)
    model = fg.MLP([2, 4], seed=0)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))
    with pytest.raises(ValueError, match=re.escape("must lie in [0, 4)")):
        step(np.zeros((3, 2), np.float32), labels)


def test_unsigned_labels_in_range_are_accepted():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 4))
    a = ops.softmax_cross_entropy(logits, np.array([0, 3, 1]))
    for dtype in (np.uint8, np.uint64, np.int32):
        b = ops.softmax_cross_entropy(logits, np.array([0, 3, 1], dtype))
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])


def test_integral_float_labels_accepted():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 4))
    a = ops.softmax_cross_entropy(logits, np.array([0, 3, 1]))
    b = ops.softmax_cross_entropy(logits, np.array([0.0, 3.0, 1.0]))
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_loss_target_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape("target: expected shape (3, 4), got (3, 5)")):
        ops.mse(LOGITS, np.zeros((3, 5)))
    with pytest.raises(ValueError, match=re.escape("target: expected shape (3, 4), got (4, 3)")):
        fg.BCEWithLogits()(LOGITS, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="logits: expected a 2-D array"):
        ops.softmax_cross_entropy(np.zeros(4), np.array([0]))


# --- dtypes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int32", "int64", "float16", "complex64", "bool", "object"])
def test_model_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="unsupported dtype .*; expected float32 or float64"):
        fg.MLP([3, 2], dtype=dtype)


def test_model_nonsense_dtype():
    with pytest.raises(TypeError, match="unsupported dtype"):
        fg.MLP([3, 2], dtype="not-a-dtype")


@pytest.mark.parametrize("wdtype", [np.int32, np.int64, np.float16, np.complex128])
def test_dense_forward_refuses_non_float_parameters(wdtype):
    x, W, b = _dense()
    with pytest.raises(TypeError, match=f"W: parameters must be float32 or float64, got {np.dtype(wdtype)}"):
        ops.dense_forward(x, W.astype(wdtype), b)
    with pytest.raises(TypeError, match="b: parameters must be float32 or float64"):
        ops.dense_forward(x, W, b.astype(wdtype))


def test_complex_and_object_inputs_refused():
    x, W, b = _dense()
    with pytest.raises(TypeError, match="x: unsupported dtype complex"):
        ops.dense_forward(x.astype(np.complex64), W, b)
    model = fg.MLP([4, 2])
    with pytest.raises(TypeError, match="unsupported dtype"):
        model.forward(np.array([[object()] * 4]))
    with pytest.raises(TypeError, match="unsupported dtype"):
        ops.mse(np.array([["a", "b"]]), np.zeros((1, 2)))


# --- conversions give the same result as clean float32 input -------------------------

@pytest.mark.parametrize("kind", ["fortran", "strided", "float64", "int", "list"])
def test_converted_inputs_match_contiguous(kind):
    rng = np.random.default_rng(5)
    model = fg.MLP([6, 7, 3], activation="gelu")
    base = rng.standard_normal((5, 12))
    if kind == "int":
        base = np.round(base * 3)
    clean = np.ascontiguousarray(base[:, ::2], dtype=np.float32)
    messy = {"fortran": np.asfortranarray(clean), "strided": base.astype(np.float32)[:, ::2],
             "float64": base[:, ::2].astype(np.float64).astype(np.float32).astype(np.float64),
             "int": base[:, ::2].astype(np.int64), "list": clean.tolist()}[kind]
    y_clean = model.forward(clean)
    y = model.forward(messy)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y_clean)
    dy = rng.standard_normal((5, 3)).astype(np.float32)
    model.forward(clean)
    dx_clean, g_clean = model.backward(dy).copy(), model.grads.copy()
    model.forward(messy)
    dx = model.backward(np.asfortranarray(dy.astype(np.float64)))
    np.testing.assert_array_equal(dx, dx_clean)
    np.testing.assert_array_equal(model.grads, g_clean)


def test_ops_converted_inputs_match_contiguous():
    rng = np.random.default_rng(6)
    x, W, b = _dense(8, 5)
    a_clean, _ = ops.dense_forward(x, W, b, "tanh")
    a1, _ = ops.dense_forward(np.asfortranarray(x), np.asfortranarray(W), b, "tanh")
    a2, _ = ops.dense_forward(x.astype(np.float64), W, b.astype(np.float64), "tanh")
    big = np.zeros((10, 16), np.float32)
    big[::2, ::2] = x
    a3, _ = ops.dense_forward(big[::2, ::2], W, b, "tanh")
    for a in (a1, a2, a3):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, a_clean)
    da = rng.standard_normal(a_clean.shape)
    g_clean = ops.dense_backward(x, W, a_clean, None, da.astype(np.float32), "tanh")
    g = ops.dense_backward(big[::2, ::2], np.asfortranarray(W), np.asfortranarray(a_clean),
                           None, da, "tanh")
    for u, v in zip(g, g_clean):
        np.testing.assert_array_equal(u, v)


def test_loss_converted_inputs_match():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((4, 6)).astype(np.float32)
    labels = np.array([1, 5, 0, 2])
    ref = ops.softmax_cross_entropy(logits, labels)
    got = ops.softmax_cross_entropy(np.asfortranarray(logits), labels.astype(np.int32)[::-1][::-1])
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[1], ref[1])
    # the caller's arrays are never written
    before = logits.copy()
    ops.softmax_cross_entropy(logits, labels)
    ops.mse(logits, np.zeros_like(logits))
    np.testing.assert_array_equal(logits, before)


# --- devices ---------------------------------------------------------------------------

class _FakeCupyArray:
    """Looks like a CuPy array to fastgrad's device detection only."""
    __module__ = "cupy._core.core"
    shape, ndim, dtype = (5, 4), 2, np.dtype(np.float32)


class _FakeDLPackCuda:
    def __dlpack_device__(self):
        return (2, 0)                       # kDLCUDA


@pytest.mark.parametrize("fake", [_FakeCupyArray, _FakeDLPackCuda])
def test_mixing_devices_is_a_type_error(fake):
    x, W, b = _dense()
    with pytest.raises(TypeError, match="arrays on different devices in one call: .* on cpu and .* on cuda|"
                                        "arrays on different devices in one call: .* on cuda and .* on cpu"):
        ops.dense_forward(x, W, fake()) if fake is _FakeCupyArray else ops.dense_forward(fake(), W, b)
    with pytest.raises(TypeError, match="different devices"):
        ops.softmax_cross_entropy(fake(), np.array([0]))


@pytest.mark.cuda
def test_mixing_real_devices_is_a_type_error():
    import cupy
    x, W, b = _dense()
    with pytest.raises(TypeError, match="different devices"):
        ops.dense_forward(cupy.asarray(x), W, b)
    model = fg.MLP([4, 3], device="cpu")
    with pytest.raises(TypeError):
        model.forward(cupy.asarray(x))


@pytest.mark.parametrize("name", ["gpu", "tpu", "", 0, "cuda:0"])
def test_unknown_device_name(name):
    with pytest.raises(ValueError, match="unknown device .*; expected 'auto', 'cpu' or 'cuda'"):
        fg.MLP([3, 2], device=name)


def test_nothing_crashes_on_nonfinite_input():
    model = fg.MLP([3, 4, 2], activation="relu")
    y = model.forward(np.array([[np.nan, np.inf, -np.inf]]))
    assert y.shape == (1, 2)
    loss, dy = fg.SoftmaxCrossEntropy()(y, np.array([1]))
    assert not np.isfinite(loss)
    model.backward(dy)
    assert to_numpy(model.grads).shape == model.params.shape

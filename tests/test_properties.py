"""Property tests (hypothesis): dense forward/backward against the reference
over random shapes, activations and dtypes."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgrad import ops, reference
from fastgrad.kernels.cpu.activations import CODES

from conftest import ACTIVATIONS, assert_close, dense_inputs, rtol_of, to_numpy

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _atols(x, W, z, da, dtype):
    x, W, da = (np.abs(np.asarray(t, np.float64)) for t in (x, W, da))
    d = da * (1.0 + np.abs(z))
    r = rtol_of(dtype)
    return r * float((x.T @ d).max()), r * float(d.sum(0).max()), r * float((d @ W.T).max())


@SETTINGS
@given(batch=st.integers(1, 40), n_in=st.integers(1, 70), n_out=st.integers(1, 70),
       activation=st.sampled_from(ACTIVATIONS), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2 ** 32 - 1), fortran=st.booleans())
def test_dense_matches_reference(device, xp, batch, n_in, n_out, activation, dtype, seed, fortran):
    rng = np.random.default_rng(seed)
    x, W, b = dense_inputs(rng, batch, n_in, n_out, dtype)
    if fortran:
        x, W = np.asfortranarray(x), np.asfortranarray(W)
    z_ref, a_ref = reference.dense_forward(x, W, b, activation)
    a, z = ops.dense_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b), activation)
    assert a.shape == (batch, n_out) and a.dtype == np.dtype(dtype)
    assert (z is None) == (CODES[activation] not in ops.NEEDS_Z)
    assert_close(a, a_ref, dtype, atol=rtol_of(dtype) * max(1.0, float(np.abs(z_ref).max())),
                 what="a")
    da = rng.standard_normal((batch, n_out)).astype(dtype)
    ref = reference.dense_backward(x, W, z_ref, da, activation)
    got = ops.dense_backward(xp.asarray(x), xp.asarray(W), a, z, xp.asarray(da), activation)
    for g, r, tol, name in zip(got, ref, _atols(x, W, z_ref, da, dtype), ("dW", "db", "dx")):
        assert to_numpy(g).shape == r.shape
        assert_close(g, r, dtype, atol=tol, what=name)


@SETTINGS
@given(batch=st.integers(1, 30), n_classes=st.integers(1, 50),
       scale=st.sampled_from([0.1, 1.0, 30.0, 3e4]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_softmax_cross_entropy_matches_reference(device, xp, batch, n_classes, scale, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((batch, n_classes)) * scale).astype(dtype)
    labels = rng.integers(0, n_classes, batch)
    loss_ref, grad_ref = reference.softmax_cross_entropy(logits, labels)
    loss, grad = ops.softmax_cross_entropy(xp.asarray(logits), xp.asarray(labels))
    assert np.isfinite(loss)
    assert_close(loss, loss_ref, dtype, atol=rtol_of(dtype) * max(1.0, scale), what="loss")
    assert_close(grad, grad_ref, dtype, atol=rtol_of(dtype) / batch, what="grad")
    # each row of the gradient sums to zero (softmax minus one-hot)
    np.testing.assert_allclose(to_numpy(grad).sum(axis=1), 0, atol=20 * rtol_of(dtype) / batch)

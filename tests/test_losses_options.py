"""PyTorch's loss options (class weights, ignore_index, label smoothing,
pos_weight, reduction) against torch.nn.functional and fastgrad.reference,
on every device (the CUDA case runs on a GPU or on the host emulator)."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import ops, reference

from conftest import DTYPES, assert_close, rtol_of, to_numpy

torch = pytest.importorskip("torch", reason="torch parity needs PyTorch (pip install 'fastgrad[peers]')")
F = torch.nn.functional

SHAPES = [(1, 1), (7, 3), (33, 17), (5, 1000)]
CE_OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(weight=True, reduction="sum"),
    dict(ignore_index=1),
    dict(ignore_index=-100, label_smoothing=0.1),
    dict(label_smoothing=0.25, reduction="none"),
    dict(weight=True, ignore_index=0, label_smoothing=0.3),
    dict(weight=True, ignore_index=2, label_smoothing=1.0, reduction="sum"),
]


def _ce_inputs(rng, shape, opts, dtype, scale=4.0):
    B, C = shape
    logits = (rng.standard_normal(shape) * scale).astype(dtype)
    labels = rng.integers(0, C, B).astype(np.int64)
    kw = dict(opts)
    if kw.pop("weight", None):
        kw["weight"] = rng.uniform(0.1, 3.0, C)
    ig = kw.get("ignore_index")
    if ig is not None and B > 1:
        labels[:: 3] = ig            # some rows ignored (-100 or a class), not all
        if np.all(labels == ig):     # every draw of the other rows hit ignore_index
            labels[1] = (ig + 1) % C
    return logits, labels, kw


def _ce_grad_atol(ref_grad, labels, kw, C):
    """The gradient's absolute tolerance: a row's gradient is s * (p - t), a
    difference of terms up to s, so its rounding is relative to the largest
    row factor s, not to the result, which cancels to ~1e-7 when every kept
    row is predicted near-certainly."""
    w = np.asarray(kw.get("weight", np.ones(C)), np.float64)
    kept = labels != kw.get("ignore_index", -100)
    scale = float(w.max())
    if kw.get("reduction", "mean") == "mean" and kept.any():
        scale /= float(w[labels[kept]].sum())
    return rtol_of(np.float64) * max(scale, float(np.abs(ref_grad).max()))


def _torch_ce(logits, labels, kw):
    t = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.tensor(tkw["weight"])
    out = F.cross_entropy(t, torch.tensor(labels), **tkw)
    out.sum().backward()
    return out.detach().numpy(), t.grad.numpy()


def _fg(device, *arrays):
    from fastgrad import device as fgd
    xp = fgd.array_module(device)
    return [xp.asarray(a) for a in arrays]


@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cross_entropy_matches_torch_float64(device, rng, shape, opts):
    logits, labels, kw = _ce_inputs(rng, shape, opts, np.float64)
    loss, grad = ops.softmax_cross_entropy(*_fg(device, logits, labels), **kw)
    ref_loss, ref_grad = _torch_ce(logits, labels, kw)
    assert_close(to_numpy(loss) if kw.get("reduction") == "none" else loss, ref_loss,
                 np.float64, what="loss vs torch")
    atol = _ce_grad_atol(ref_grad, labels, kw, shape[1])
    assert_close(grad, ref_grad, np.float64, atol=atol, what="grad vs torch")
    r_loss, r_grad = reference.cross_entropy(logits, labels, **kw)
    assert_close(to_numpy(loss) if kw.get("reduction") == "none" else loss, r_loss,
                 np.float64, what="loss vs reference")
    assert_close(grad, r_grad, np.float64, atol=atol, what="grad vs reference")


@pytest.mark.parametrize("opts", CE_OPTIONS[3:], ids=lambda o: ",".join(o))
def test_cross_entropy_extreme_logits(device, rng, opts):
    # rows that are near certain (p_label ~ 1 - 1e-40), certainly wrong, and
    # spread over +-1e4: every term finite, gradients exact to rounding
    B, C = 9, 6
    logits, labels, kw = _ce_inputs(rng, (B, C), opts, np.float64, scale=1.0)
    # (rows 0, 3, 6 may be ignored)
    logits[1] = -50.0
    logits[1, labels[1]] = 50.0
    logits[2] = 1e4
    logits[2, labels[2]] = -1e4
    logits[4] = rng.uniform(-1e4, 1e4, C)
    logits[5] = 700.0
    loss, grad = ops.softmax_cross_entropy(*_fg(device, logits, labels), **kw)
    ref_loss, ref_grad = _torch_ce(logits, labels, kw)
    loss = to_numpy(loss) if kw.get("reduction") == "none" else loss
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(to_numpy(grad)))
    assert_close(loss, ref_loss, np.float64, what="loss vs torch")
    assert_close(grad, ref_grad, np.float64, atol=1e-15, what="grad vs torch")


@pytest.mark.parametrize("opts", [o for o in CE_OPTIONS if not o.get("label_smoothing")],
                         ids=lambda o: ",".join(o) or "defaults")
def test_cross_entropy_masked_logits_as_torch(device, rng, opts):
    """A -inf logit (a masked class) off the label, without smoothing, is a
    finite loss, as in torch: the smoothing term's sum over the logits was
    -inf there, and 0 * -inf made every option's loss NaN."""
    logits, labels, kw = _ce_inputs(rng, (7, 5), opts, np.float64)
    for i in range(7):
        logits[i, (labels[i] + 1 + i % 4) % 5] = -np.inf
    loss, grad = ops.softmax_cross_entropy(*_fg(device, logits, labels), **kw)
    ref_loss, ref_grad = _torch_ce(logits, labels, kw)
    loss = to_numpy(loss) if kw.get("reduction") == "none" else loss
    assert np.all(np.isfinite(loss))
    assert_close(loss, ref_loss, np.float64, what="loss vs torch")
    assert_close(grad, ref_grad, np.float64, atol=1e-15, what="grad vs torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("opts", CE_OPTIONS[1:], ids=lambda o: ",".join(o))
def test_cross_entropy_dtype_vs_reference(device, rng, dtype, opts):
    logits, labels, kw = _ce_inputs(rng, (65, 11), opts, dtype)
    loss, grad = ops.softmax_cross_entropy(*_fg(device, logits, labels), **kw)
    assert to_numpy(grad).dtype == dtype
    r_loss, r_grad = reference.cross_entropy(logits, labels, **kw)
    assert_close(to_numpy(loss) if kw.get("reduction") == "none" else loss, r_loss, dtype,
                 what="loss")
    assert_close(grad, r_grad, dtype, what="grad")


def test_cross_entropy_gradient_vs_finite_differences(rng):
    B, C = 5, 4
    logits, labels, kw = _ce_inputs(rng, (B, C), dict(weight=True, ignore_index=2,
                                                      label_smoothing=0.2), np.float64)
    labels = np.array([2, 0, 1, 2, 3])       # two rows ignored, three kept
    loss, grad = ops.softmax_cross_entropy(logits, labels, **kw)
    h = 1e-5
    num = np.empty_like(logits)
    for idx in np.ndindex(logits.shape):
        up, dn = logits.copy(), logits.copy()
        up[idx] += h
        dn[idx] -= h
        num[idx] = (ops.softmax_cross_entropy(up, labels, **kw)[0]
                    - ops.softmax_cross_entropy(dn, labels, **kw)[0]) / (2 * h)
    # central differences: truncation ~h^2, rounding ~eps*|loss|/h (a few
    # 1e-10 here: a fixed 1e-9 failed for some draws)
    atol = 50 * np.finfo(np.float64).eps * max(1.0, abs(loss)) / h + h * h
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=atol)


def test_default_ignore_index_follows_torch(rng):
    logits = rng.standard_normal((6, 4))
    labels = np.array([0, -100, 3, 2, -100, 1])
    loss, grad = ops.softmax_cross_entropy(logits, labels)
    ref_loss, ref_grad = _torch_ce(logits, labels, {})
    assert_close(loss, ref_loss, np.float64)
    assert_close(grad, ref_grad, np.float64)
    assert not grad[1].any() and not grad[4].any()
    # all rows ignored: torch's 0/0
    loss, grad = ops.softmax_cross_entropy(logits, np.full(6, -100))
    assert np.isnan(loss) and np.isnan(float(F.cross_entropy(
        torch.tensor(logits), torch.full((6,), -100))))


def test_plain_call_keeps_the_fused_default_kernel(rng):
    # no option set: the very kernel TrainStep fuses, bit for bit
    logits = rng.standard_normal((9, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 9)
    g = np.empty_like(logits)
    want = fg.kernels.cpu.softmax_cross_entropy(logits, labels, g)
    loss, grad = ops.softmax_cross_entropy(logits, labels)
    assert loss == float(want) and np.array_equal(grad, g)


BCE_OPTIONS = [dict(reduction="sum"), dict(reduction="none"), dict(pos_weight="vec"),
               dict(pos_weight=3.0, reduction="sum"), dict(pos_weight="vec", reduction="none")]


def _bce_kw(rng, opts, C):
    kw = dict(opts)
    if kw.get("pos_weight") == "vec":
        kw["pos_weight"] = rng.uniform(0.2, 5.0, C)
    return kw


def _torch_bce(x, t, kw):
    tx = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    tkw = dict(kw)
    if "pos_weight" in tkw:
        tkw["pos_weight"] = torch.as_tensor(np.asarray(tkw["pos_weight"], np.float64))
    out = F.binary_cross_entropy_with_logits(tx, torch.tensor(np.asarray(t, np.float64)), **tkw)
    out.sum().backward()
    return out.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize("opts", BCE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bce_matches_torch_float64(device, rng, shape, opts):
    x = rng.standard_normal(shape) * 5
    x.flat[0] = 1e4
    x.flat[-1] = -1e4
    t = rng.uniform(0, 1, shape)
    t[rng.uniform(size=shape) < 0.3] = 0.0
    kw = _bce_kw(rng, opts, shape[1])
    loss, grad = ops.bce_with_logits(*_fg(device, x, t), **kw)
    ref_loss, ref_grad = _torch_bce(x, t, kw)
    loss = to_numpy(loss) if kw.get("reduction") == "none" else loss
    # torch's softplus(-x) is log(exp(-m) + exp(-x - m)) + m: it rounds
    # log(1 + 1e-40) to 0 where log1p keeps it; absolute agreement there.
    assert_close(loss, ref_loss, np.float64, atol=1e-12 * max(1.0, np.abs(ref_loss).max()),
                 what="loss vs torch")
    assert_close(grad, ref_grad, np.float64, what="grad vs torch")
    r_loss, r_grad = reference.bce_with_logits_ex(x, t, **kw)
    assert_close(loss, r_loss, np.float64, what="loss vs reference")
    assert_close(grad, r_grad, np.float64, what="grad vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("opts", BCE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_bce_dtype_vs_reference(device, rng, dtype, opts):
    x = (rng.standard_normal((31, 7)) * 4).astype(dtype)
    t = rng.uniform(0, 1, (31, 7)).astype(dtype)
    kw = _bce_kw(rng, opts, 7)
    loss, grad = ops.bce_with_logits(*_fg(device, x, t), **kw)
    assert to_numpy(grad).dtype == dtype
    r_loss, r_grad = reference.bce_with_logits_ex(x, t, **kw)
    assert_close(to_numpy(loss) if kw.get("reduction") == "none" else loss, r_loss, dtype)
    assert_close(grad, r_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_mse_reductions(device, rng, dtype, reduction):
    p = rng.standard_normal((13, 5)).astype(dtype)
    t = rng.standard_normal((13, 5)).astype(dtype)
    loss, grad = ops.mse(*_fg(device, p, t), reduction=reduction)
    tp = torch.tensor(p.astype(np.float64), requires_grad=True)
    out = F.mse_loss(tp, torch.tensor(t.astype(np.float64)), reduction=reduction)
    out.sum().backward()
    assert_close(to_numpy(loss) if reduction == "none" else loss, out.detach().numpy(), dtype)
    assert_close(grad, tp.grad.numpy(), dtype)


def test_loss_objects_on_the_layer_path(rng):
    """A weighted, smoothed cross-entropy trains through model(x) / backward:
    the parameter gradients equal torch's."""
    model = fg.MLP([6, 8, 4], activation="tanh", dtype="float64", seed=3)
    x = rng.standard_normal((10, 6))
    y = rng.integers(0, 4, 10)
    y[2] = -1
    w = rng.uniform(0.5, 2.0, 4)
    loss_fn = fg.SoftmaxCrossEntropy(weight=w, label_smoothing=0.1, ignore_index=-1,
                                     reduction="sum")
    assert set(loss_fn.options) == {"weight", "label_smoothing", "ignore_index", "reduction"}
    loss, dy = loss_fn(model(x), y)
    model.backward(dy)
    tm = model.to_torch()
    tl = torch.nn.CrossEntropyLoss(weight=torch.tensor(w), label_smoothing=0.1, ignore_index=-1,
                                   reduction="sum")(tm(torch.tensor(x)), torch.tensor(y))
    tl.backward()
    assert loss == pytest.approx(tl.item(), rel=1e-12)
    np.testing.assert_allclose(model.layers[0].dW, tm[0].weight.grad.numpy().T, rtol=1e-10,
                               atol=1e-13)
    bce = fg.BCEWithLogits(pos_weight=2.0)
    assert bce.options == {"pos_weight": 2.0}
    assert fg.SoftmaxCrossEntropy().options == {} and fg.MSE().options == {}


@pytest.mark.parametrize("loss_fn", [
    fg.SoftmaxCrossEntropy(label_smoothing=0.1, weight=[1.0, 2.0, 0.5], ignore_index=0),
    fg.MSE(reduction="sum"),
    fg.BCEWithLogits(pos_weight=[1.0, 3.0, 0.5]),
], ids=["ce", "mse", "bce"])
def test_train_step_with_options_is_the_layer_loop(device, rng, loss_fn):
    """TrainStep given a loss with options follows the layer-path loop."""
    x = rng.standard_normal((12, 4))
    if loss_fn.name == "softmax_cross_entropy":
        y = rng.integers(0, 3, 12)
    else:
        y = rng.uniform(0, 1, (12, 3))
    a = fg.MLP([4, 6, 3], dtype="float64", seed=2, device=device)
    b = fg.MLP([4, 6, 3], dtype="float64", seed=2, device=device)
    opt_a, opt_b = fg.Adam(a, lr=0.05), fg.Adam(b, lr=0.05)
    step = fg.TrainStep(b, loss_fn, opt_b)
    xa, ya = _fg(device, x, y)
    for _ in range(3):
        loss, dy = loss_fn(a(xa), ya)
        a.backward(dy)
        opt_a.step()
        assert float(step(x, y)) == loss
    assert np.array_equal(to_numpy(a.params), to_numpy(b.params))
    with pytest.raises(ValueError, match="cuda_graph=True fuses the default losses only"):
        fg.TrainStep(b, loss_fn, opt_b, cuda_graph=True)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, y: ops.softmax_cross_entropy(x, y, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda x, y: ops.softmax_cross_entropy(x, y, reduction="avg"), ValueError, "reduction"),
    (lambda x, y: ops.softmax_cross_entropy(x, y, weight=np.ones(3)), ValueError, r"weight: expected shape \(4,\)"),
    (lambda x, y: ops.softmax_cross_entropy(x, y, weight=["a"] * 4), TypeError, "weight"),
    # a scalar class weight is refused, as torch refuses it (pos_weight broadcasts)
    (lambda x, y: ops.softmax_cross_entropy(x, y, weight=2.0), ValueError, r"weight: expected shape \(4,\)"),
    (lambda x, y: ops.softmax_cross_entropy(x, y, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda x, y: ops.softmax_cross_entropy(x, np.array([0, 1, 9]), weight=np.ones(4)), ValueError, r"\[0, 4\)"),
    (lambda x, y: ops.softmax_cross_entropy(x, np.array([0, -1, 2])), ValueError, "ignore_index=-100"),
    (lambda x, y: ops.bce_with_logits(x, np.zeros((3, 4)), pos_weight=np.ones(5)), ValueError, "pos_weight"),
    (lambda x, y: ops.mse(x, x, reduction="max"), ValueError, "reduction"),
    (lambda x, y: fg.SoftmaxCrossEntropy(reduction="none"), ValueError, "reduction"),
    (lambda x, y: fg.BCEWithLogits(pos_weight=np.ones((2, 2))), ValueError, "pos_weight"),
])
def test_bad_options(call, exc, match):
    x = np.zeros((3, 4))
    y = np.array([0, 1, 2])
    with pytest.raises(exc, match=match):
        call(x, y)


def test_evaluate_takes_whole_number_float_labels_with_class_weights(rng):
    # loss_fn takes them (as ops.as_labels); the divisor indexed the
    # weights with the floats (IndexError, in fit after a trained epoch)
    model = fg.MLP([4, 5, 3], dtype="float64", seed=0)
    x, y = rng.standard_normal((10, 4)), rng.integers(0, 3, 10)
    loss = fg.SoftmaxCrossEntropy(weight=[1.0, 2.0, 3.0])
    want = fg.evaluate(model, loss, x, y, batch_size=4)
    assert fg.evaluate(model, loss, x, y.astype(np.float64), batch_size=4) == want


def test_evaluate_sum_reduction_is_per_sample(rng):
    model = fg.MLP([4, 5, 3], dtype="float64", seed=0)
    x, y = rng.standard_normal((10, 4)), rng.integers(0, 3, 10)
    mean = fg.evaluate(model, fg.SoftmaxCrossEntropy(), x, y, batch_size=3)["loss"]
    summed = fg.evaluate(model, fg.SoftmaxCrossEntropy(reduction="sum"), x, y,
                         batch_size=3)["loss"]
    assert summed == pytest.approx(mean, rel=1e-12)


@pytest.mark.parametrize("kw", [dict(weight=[1.0, 5.0, 0.2]), dict(ignore_index=1),
                                dict(weight=[0.5, 2.0, 1.0], ignore_index=0, label_smoothing=0.2),
                                dict(weight=[1.0, 5.0, 0.2], reduction="sum")],
                         ids=["weight", "ignore", "all", "weight-sum"])
def test_evaluate_and_fit_are_the_whole_sets_mean_whatever_the_batches(device, rng, kw):
    # each batch weighed by its samples gave 1.218 for torch's 1.263
    # (weights, batches of 4) and NaN for a batch of ignored labels only;
    # the ignored labels counted as wrong answers in the accuracy
    model = fg.MLP([4, 5, 3], dtype="float64", seed=0, device=device)
    x, y = rng.standard_normal((11, 4)), rng.integers(0, 3, 11)
    y[[1, 2, 3]] = kw.get("ignore_index", y[1])     # a batch of 4 with one kept label
    loss = fg.SoftmaxCrossEntropy(**kw)
    logits = torch.tensor(to_numpy(model.predict(x)))
    tkw = dict(kw, reduction="mean")
    if "weight" in kw:
        tkw["weight"] = torch.tensor(kw["weight"], dtype=torch.float64)
    want = float(torch.nn.functional.cross_entropy(logits, torch.tensor(y), **tkw))
    kept = y != kw.get("ignore_index", -100)
    acc = float((logits.argmax(1).numpy() == y)[kept].mean())
    for bs in (1, 2, 4, 11):
        got = fg.evaluate(model, loss, x, y, batch_size=bs)
        assert got["loss"] == pytest.approx(want, rel=1e-12), bs
        assert got["accuracy"] == pytest.approx(acc, rel=1e-12), bs
    # fit's epoch loss (lr 0: every batch sees the same parameters)
    step = fg.TrainStep(model, loss, fg.SGD(model, lr=0.0))
    hist = fg.fit(step, *_fg(device, x, y), epochs=2, batch_size=4, seed=1, progress=False)
    assert hist["loss"] == pytest.approx([want, want], rel=1e-12)


@pytest.mark.parametrize("opts", [CE_OPTIONS[4], CE_OPTIONS[8]], ids=lambda o: ",".join(o))
def test_cross_entropy_extreme_logits_float32(device, rng, opts):
    B, C = 6, 5
    logits, labels, kw = _ce_inputs(rng, (B, C), opts, np.float32, scale=1.0)
    logits[1] = -30.0
    logits[1, labels[1]] = 30.0                 # p_label = 1 - 4e-26
    logits[2] = 1e4
    logits[2, labels[2]] = -1e4
    logits[4] = rng.uniform(-1e4, 1e4, C).astype(np.float32)
    loss, grad = ops.softmax_cross_entropy(*_fg(device, logits, labels), **kw)
    r_loss, r_grad = reference.cross_entropy(logits, labels, **kw)
    assert np.isfinite(loss) and np.all(np.isfinite(to_numpy(grad)))
    assert_close(loss, r_loss, np.float32, what="loss")
    assert_close(grad, r_grad, np.float32, what="grad")

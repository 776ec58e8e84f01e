"""The functional backend: one checked entry point per kernel.

Every function validates its inputs (shape, dtype, labels) before any kernel
runs, converts what can be converted safely (Fortran-order, strided or float64
data into a float32 computation) and refuses what cannot (integer parameters,
wrong shapes).  It then dispatches to ``fastgrad.kernels.cpu`` or ``.cuda``,
which share names and signatures.

Shapes follow DESIGN.md: batches are ``(batch, features)``, ``W`` is
``(in_features, out_features)`` and ``a = f(x @ W + b)``.
"""
import numpy as np

from . import device as _device
from . import registry as _registry
from .backend import backend_for
from .kernels.spec import CODES, DEFAULT_ALPHA, FIRST_CUSTOM_CODE, NEEDS_Z  # noqa: F401

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

__all__ = [
    "resolve_activation", "check_dtype", "dense_forward", "dense_backward",
    "activation_forward", "activation_backward", "softmax_cross_entropy",
    "mse", "bce_with_logits",
]


# --- checks ----------------------------------------------------------------

def resolve_activation(name, alpha=None):
    """(code, alpha) for an activation name (``fastgrad.registry``: built-in or
    registered); ValueError for unknown names."""
    if name is None:
        name = "identity"
    spec = _registry.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown activation {name!r}; expected one of "
                         f"{sorted(_registry.names())} (an activation of your own: "
                         "fastgrad.register_activation it first)")
    if alpha is None:
        alpha = 0.0 if spec.alpha is None else spec.alpha
    if isinstance(alpha, (str, bytes, bool, np.bool_)):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    alpha = float(alpha)
    if spec.builtin and name in DEFAULT_ALPHA and not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"{name} needs a finite alpha >= 0, got {alpha}")
    if not np.isfinite(alpha):
        raise ValueError(f"{name} needs a finite alpha, got {alpha}")
    return spec.code, alpha


def needs_z(code):
    """True when activation ``code``'s derivative reads the pre-activation z
    (layers then keep it); built-in or registered."""
    code = int(code)
    if code < FIRST_CUSTOM_CODE:
        return code in NEEDS_Z
    spec = _registry.by_code(code)
    return spec is not None and spec.needs_z


def kernels_for(dev, codes):
    """The kernel package of ``dev`` that serves activation ``codes``: the
    device's own, or for registered activations on the CPU the registry's
    copy (``fastgrad.registry.cpu_kernels``).  On CUDA, registered
    activations need their CUDA forms (compiled into the device's kernels
    here); without them this raises ValueError.  (``Backend.kernels_for``.)"""
    return backend_for(dev).kernels_for(codes)


def model_kernels(dev, codes, rules=None, losses=None):
    """The kernel package a model with activation ``codes`` runs on: on the
    CPU a copy of the package compiled for those activations alone, and for
    the update ``rules`` and ``losses`` codes given (None: all;
    ``fastgrad.registry.cpu_kernels``: a cold first step compiles only what
    the model uses), on CUDA :func:`kernels_for`'s.
    (``Backend.model_kernels``.)"""
    return backend_for(dev).model_kernels(codes, rules=rules, losses=losses)


def check_dtype(dtype):
    """np.dtype of a supported parameter dtype (float32/float64) or TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}; expected float32 or float64") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"unsupported dtype {dt}; expected float32 or float64")
    return dt


def _device_of(*arrays):
    """The one device all arrays live on; TypeError naming both if mixed."""
    found = {}
    for a in arrays:
        if a is not None:
            found.setdefault(_device.device_of(a), type(a).__name__)
    if len(found) > 1:
        desc = " and ".join(f"{t} on {d}" for d, t in found.items())
        raise TypeError(f"arrays on different devices in one call: {desc}")
    return next(iter(found), "cpu")


def as_array(x, name, dtype, ndim=None, shape=None, xp=np):
    """``x`` as a C-contiguous array of ``dtype`` (copying only if needed).

    Real numbers of any dtype are converted (float64 data into a float32
    model, Fortran order, strides); complex, object and non-numeric input
    is refused.
    """
    if (type(x) is xp.ndarray and x.dtype == dtype and shape is not None
            and len(shape) == x.ndim and x.flags.c_contiguous):
        # the hot path of a training loop: nothing to do (a plain loop, not
        # all() over a generator: ~1 us of a tiny net's step)
        for want, got in zip(shape, x.shape):
            if want is not None and want != got:
                break
        else:
            return x
    arr = _readable(x, name, xp)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: unsupported dtype {arr.dtype}; expected real numbers")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    if shape is not None:
        want = tuple(shape)
        if len(want) != arr.ndim or any(w is not None and w != g for w, g in zip(want, arr.shape)):
            exp = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
            raise ValueError(f"{name}: expected shape {exp}, got {tuple(arr.shape)}")
    # not ascontiguousarray, which makes a 0-d array 1-d
    return xp.asarray(arr, dtype=dtype, order="C")


def _readable(x, name, xp):
    """``xp.asarray(x)``; a torch tensor that requires grad reads as its
    values (as torch's own ops), one NumPy cannot read (bfloat16) is
    refused by name."""
    if hasattr(x, "detach") and type(x).__module__.startswith("torch"):
        x = x.detach()
    try:
        return xp.asarray(x)
    except TypeError as e:     # e.g. a bfloat16 tensor: "Got unsupported ScalarType"
        raise TypeError(f"{name}: cannot be read as a {xp.__name__} array of real numbers "
                        f"({type(x).__name__}: {e}); convert it to float32 or float64") from e


def as_param(x, name, ndim, shape=None, xp=np):
    """A parameter array: float32/float64 only (integer parameters are refused)."""
    arr = _readable(x, name, xp)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: parameters must be float32 or float64, got {arr.dtype}")
    return as_array(arr, name, arr.dtype, ndim=ndim, shape=shape, xp=xp)


def as_labels(labels, n_rows, n_classes, xp=np, check_range=True):
    """Integer class labels of length ``n_rows`` in [0, n_classes).

    ``check_range=False`` leaves the range to the caller: a CUDA training
    step checks device labels in its loss kernel instead of reading them
    back (a sync)."""
    if (xp is np and type(labels) is np.ndarray and labels.dtype == np.int64
            and labels.ndim == 1 and labels.shape[0] == n_rows and labels.flags.c_contiguous):
        # the hot path of a training loop: the range in one reduction (a
        # negative label read as unsigned is beyond any class count), its
        # bounds read only to say what is wrong
        if n_rows and check_range and labels.view(np.uint64).max() >= n_classes:
            _check_label_range(labels.min(), labels.max(), n_classes)
        return labels
    lab = _readable(labels, "labels", xp)
    host = None         # the labels on the host, read at most once from a device
    if lab.dtype.kind not in "iu":
        if lab.dtype.kind == "f" and lab.size:
            host = _device.to_numpy(lab)
        if host is None or not np.all(host == np.round(host)):
            raise TypeError(f"labels: expected integer class indices, got dtype {lab.dtype}")
    if (lab.dtype == np.uint64 or lab.dtype.kind == "f") and lab.size:
        # beyond int64 a cast wraps (2**64 - 100 would become ignore_index -100)
        host = _device.to_numpy(lab) if host is None else host
        if host.max() >= 2.0 ** 63 or (lab.dtype.kind == "f" and host.min() < -2.0 ** 63):
            raise ValueError(f"labels: class indices must lie in [0, {n_classes}), got "
                             f"max {host.max()}")
    if lab.dtype != np.int64:
        lab = lab.astype(np.int64)
        host = None
    if lab.ndim != 1 or lab.shape[0] != n_rows:
        raise ValueError(f"labels: expected shape ({n_rows},), got {tuple(lab.shape)}")
    if lab.size and check_range:
        host = _device.to_numpy(lab) if host is None else host
        _check_label_range(host.min(), host.max(), n_classes)
    return xp.ascontiguousarray(lab, dtype=np.int64)


def _check_label_range(lo, hi, n_classes):
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"labels: class indices must lie in [0, {n_classes}), "
                         f"got min {int(lo)}, max {int(hi)}")


def check_class_range(host, n_classes, ignore_index, name="labels"):
    """Raise unless the host labels other than ``ignore_index`` lie in
    ``[0, n_classes)``."""
    kept = host[host != ignore_index]
    if kept.size:
        lo, hi = int(kept.min()), int(kept.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{name}: class indices must lie in [0, {n_classes}), got min {lo}, "
                             f"max {hi} (labels equal to ignore_index={ignore_index} are "
                             "skipped)")


def _nonempty(arr, name):
    if arr.size == 0:
        raise ValueError(f"{name}: empty array of shape {tuple(arr.shape)}")


# --- dense -----------------------------------------------------------------

def dense_forward(x, W, b, activation="identity", alpha=None):
    """Fused dense forward ``a = f(x @ W + b)``: one GEMM, one pass.

    Parameters
    ----------
    x : (batch, n_in) array, converted to W's dtype.
    W : (n_in, n_out) float32/float64 array.
    b : (n_out,) array of W's dtype.
    activation : str, a name of ``fastgrad.registry``; ``alpha`` for leaky_relu / elu.

    Returns
    -------
    a : (batch, n_out) array
    z : the pre-activation (batch, n_out) when the activation's derivative
        needs it (gelu, gelu_tanh, silu, registered ones with needs="z"), else
        None.  Pass both to :func:`dense_backward`.
    """
    dev = _device_of(x, W, b)
    code, alpha = resolve_activation(activation, alpha)
    xp, k = _device.array_module(dev), kernels_for(dev, (code,))
    W = as_param(W, "W", 2, xp=xp)
    n_in, n_out = W.shape
    b = as_param(b, "b", 1, shape=(n_out,), xp=xp).astype(W.dtype, copy=False)
    x = as_array(x, "x", W.dtype, shape=(None, n_in), xp=xp)
    _nonempty(x, "x")
    a = xp.empty((x.shape[0], n_out), W.dtype)
    z = xp.empty_like(a) if needs_z(code) else a
    k.dense_forward(x, W, b, z, a, code, alpha)
    return a, (z if needs_z(code) else None)


def dense_backward(x, W, a, z, da, activation="identity", alpha=None, need_dx=True):
    """Gradients of ``a = f(x @ W + b)`` given ``da = dL/da``.

    One pass computes ``dz = da * f'`` (from ``a``, or ``z`` when it needs z) and
    ``db``; then two GEMMs give ``dW = x^T dz`` and ``dx = dz W^T``.

    Returns ``(dW, db, dx)``; ``dx`` is None when ``need_dx`` is False.
    """
    dev = _device_of(x, W, a, z, da)
    code, alpha = resolve_activation(activation, alpha)
    xp, k = _device.array_module(dev), kernels_for(dev, (code,))
    W = as_param(W, "W", 2, xp=xp)
    n_in, n_out = W.shape
    x = as_array(x, "x", W.dtype, shape=(None, n_in), xp=xp)
    _nonempty(x, "x")
    rows = (x.shape[0], n_out)
    a = as_array(a, "a", W.dtype, shape=rows, xp=xp)
    da = as_array(da, "da", W.dtype, shape=rows, xp=xp)
    if needs_z(code):
        if z is None:
            raise ValueError(f"{activation} backward needs z from dense_forward")
        z = as_array(z, "z", W.dtype, shape=rows, xp=xp)
    else:
        z = a
    dz = xp.empty_like(da)
    dW, db = xp.empty_like(W), xp.empty(n_out, W.dtype)
    dx = xp.empty_like(x) if need_dx else dz[:0, :0]
    k.dense_backward(x, W, a, z, da, dz, dW, db, dx, code, alpha, bool(need_dx))
    return dW, db, (dx if need_dx else None)


# --- activations -------------------------------------------------------------

def _as_2d(arr):
    return arr.reshape(1, -1) if arr.ndim != 2 else arr


def activation_forward(z, activation, alpha=None, dtype=None):
    """``f(z)`` elementwise (any shape; float32/float64 kept, other dtypes
    -- float16, integers -- computed in float32)."""
    dev = _device_of(z)
    code, alpha = resolve_activation(activation, alpha)
    xp, k = _device.array_module(dev), kernels_for(dev, (code,))
    zz = _readable(z, "z", xp)
    dt = check_dtype(dtype) if dtype is not None else (zz.dtype if zz.dtype in FLOAT_DTYPES else np.dtype(np.float32))
    zz = as_array(zz, "z", dt, xp=xp)
    out = xp.empty_like(zz)
    if zz.size:
        k.activation_forward(_as_2d(zz), _as_2d(out), code, alpha)
    return out


def activation_backward(da, a, z, activation, alpha=None):
    """``da * f'(z)``, with f' read from the output ``a`` (or ``z`` when it needs z)."""
    dev = _device_of(da, a, z)
    code, alpha = resolve_activation(activation, alpha)
    xp, k = _device.array_module(dev), kernels_for(dev, (code,))
    a_arr = _readable(a, "a", xp)
    dt = a_arr.dtype if a_arr.dtype in FLOAT_DTYPES else np.dtype(np.float32)
    a_arr = as_array(a_arr, "a", dt, xp=xp)
    da = as_array(da, "da", dt, shape=a_arr.shape, xp=xp)
    if needs_z(code):
        if z is None:
            raise ValueError(f"{activation} backward needs the pre-activation z")
        z = as_array(z, "z", dt, shape=a_arr.shape, xp=xp)
    else:
        z = a_arr
    dz = xp.empty_like(da)
    if dz.size:
        k.activation_backward(_as_2d(da), _as_2d(a_arr), _as_2d(z), _as_2d(dz), code, alpha)
    return dz


# --- losses ------------------------------------------------------------------

def _pred(y, name, xp):
    arr = _readable(y, name, xp)
    dt = arr.dtype if arr.dtype in FLOAT_DTYPES else np.dtype(np.float32)
    arr = as_array(arr, name, dt, ndim=2, xp=xp)
    _nonempty(arr, name)
    return arr


REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction, allowed=REDUCTIONS):
    """``reduction`` if it is one of ``allowed``, else ValueError."""
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}")
    return reduction


def check_label_smoothing(label_smoothing):
    """A label smoothing in [0, 1] as a float (torch's range), else ValueError."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, np.number)) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    return int(ignore_index)


def class_weights(weight, n, name, xp=np, scalar_ok=False):
    """``weight`` as a float64 array of shape (n,) on ``xp`` (None: ones).

    With ``scalar_ok`` a scalar is broadcast (pos_weight, as torch
    broadcasts it); anything else must have shape (n,), as torch's class
    ``weight`` must."""
    if weight is None:
        return xp.ones(n, np.float64)
    if hasattr(weight, "detach"):                 # a torch tensor
        weight = weight.detach().cpu().numpy()
    w = xp.asarray(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected real numbers, got dtype {w.dtype}")
    if w.ndim == 0 and scalar_ok:
        w = xp.full(n, float(w), np.float64)
    if w.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(w.shape)}")
    return xp.ascontiguousarray(w, dtype=np.float64)


def _result(total, terms, reduction):
    return terms if reduction == "none" else float(total)


def softmax_cross_entropy(logits, labels, weight=None, ignore_index=-100, label_smoothing=0.0,
                          reduction="mean"):
    """Softmax cross-entropy on integer labels: ``(loss, dlogits)``.

    The options are ``torch.nn.functional.cross_entropy``'s, fused in one
    pass per row on either device.

    Parameters
    ----------
    logits : (batch, classes) array
    labels : (batch,) integer class indices in ``[0, classes)`` or equal to
        ``ignore_index``
    weight : (classes,) array, optional
        Rescales each class's loss; the mean then divides by the summed
        weights of the rows' labels (torch's weighted mean).
    ignore_index : int
        Rows with this label cost nothing and get a zero gradient, and do not
        count in the mean (default -100, as torch).
    label_smoothing : float in [0, 1]
        Mixes the one-hot target with the uniform distribution.
    reduction : "mean" (default), "sum" or "none"

    Returns
    -------
    loss : float, or for ``reduction="none"`` the float64 per-row losses
        (an array on the logits' device)
    dlogits : gradient of the reduced loss (for "none": of the sum of the
        per-row losses), in the logits' dtype
    """
    dev = _device_of(logits, labels)
    xp, k = _device.array_module(dev), _device.kernels(dev)
    logits = _pred(logits, "logits", xp)
    reduction = check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    ignore_index = check_ignore_index(ignore_index)
    B, C = logits.shape
    plain = weight is None and label_smoothing == 0.0 and reduction == "mean"
    lab = as_labels(labels, B, C, xp=xp, check_range=False)
    host = _device.to_numpy(lab)        # device labels: one read of B integers
    lo, hi = (int(host.min()), int(host.max())) if host.size else (0, 0)
    if plain and lo >= 0 and hi < C and not (lo <= ignore_index <= hi
                                             and bool((host == ignore_index).any())):
        grad = xp.empty_like(logits)
        return float(k.softmax_cross_entropy(logits, lab, grad)), grad
    if lo < 0 or hi >= C:
        check_class_range(host, C, ignore_index)
    w = class_weights(weight, C, "weight", xp)
    grad = xp.empty_like(logits)
    terms = xp.empty(B, np.float64)
    kl = _device.kernels(dev).losses     # the CPU and CUDA twins share names
    total = kl.softmax_cross_entropy_ex(logits, lab, w, ignore_index, label_smoothing,
                                        kl.REDUCTIONS[reduction], grad, terms)
    return _result(total, terms, reduction), grad


def _elementwise_loss(kernel_name, pred, target, pname):
    dev = _device_of(pred, target)
    xp, k = _device.array_module(dev), _device.kernels(dev)
    pred = _pred(pred, pname, xp)
    target = as_array(target, "target", pred.dtype, shape=pred.shape, xp=xp)
    grad = xp.empty_like(pred)
    loss = getattr(k, kernel_name)(pred, target, grad)
    return float(loss), grad


def _elementwise_ex(kernel_name, pred, target, pname, reduction, *extra):
    dev = _device_of(pred, target)
    xp = _device.array_module(dev)
    pred = _pred(pred, pname, xp)
    target = as_array(target, "target", pred.dtype, shape=pred.shape, xp=xp)
    grad = xp.empty_like(pred)
    terms = xp.empty(pred.shape, np.float64)
    kl = _device.kernels(dev).losses     # the CPU and CUDA twins share names
    extra = [e(xp, pred.shape[1]) if callable(e) else e for e in extra]
    total = getattr(kl, kernel_name)(pred, target, *extra, kl.REDUCTIONS[reduction], grad, terms)
    return _result(total, terms, reduction), grad


def mse(pred, target, reduction="mean"):
    """Squared error (torch.nn.MSELoss): ``(loss, dpred)``.

    ``reduction``: "mean" over all elements (default), "sum", or "none"
    (the float64 per-element losses; the gradient is then each element's
    own)."""
    if check_reduction(reduction) == "mean":
        return _elementwise_loss("mse", pred, target, "pred")
    return _elementwise_ex("mse_ex", pred, target, "pred", reduction)


def bce_with_logits(logits, target, pos_weight=None, reduction="mean"):
    """Binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss).

    ``pos_weight`` (a number or one per column, optional) weighs the
    positive term: ``(1 - t) x + (1 + (pos_weight - 1) t) softplus(-x)``.
    ``reduction``: "mean" (default), "sum" or "none" (per-element float64
    losses; the gradient is then each element's own)."""
    if check_reduction(reduction) == "mean" and pos_weight is None:
        return _elementwise_loss("bce_with_logits", logits, target, "logits")
    return _elementwise_ex("bce_with_logits_ex", logits, target, "logits", reduction,
                           lambda xp, n: class_weights(pos_weight, n, "pos_weight", xp,
                                                     scalar_ok=True))

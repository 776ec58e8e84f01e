"""Plain NumPy float64 twin of every fastgrad op: the oracle of all tests.

Nothing here is fast or clever on purpose: each function is the textbook
formula in float64, written so that a reader can check it by eye.
"""
import math

import numpy as np

# --- activations -----------------------------------------------------------

_GELU_K = np.sqrt(2.0 / np.pi)
_GELU_C = 0.044715


def _logistic(z):
    """(sigmoid(z), 1 - sigmoid(z)), each to float64 rounding for any z:
    with e = exp(-|z|) <= 1, both are a ratio of e or 1 over 1 + e."""
    e = np.exp(-np.abs(z))
    pos = z >= 0
    return np.where(pos, 1.0, e) / (1.0 + e), np.where(pos, e, 1.0) / (1.0 + e)


_SQRT1_2 = 1.0 / np.sqrt(2.0)
_erfc = np.vectorize(math.erfc, otypes=[np.float64])     # libm's, exact to rounding


def _gelu(z, alpha):
    # z Phi(z), Phi(z) = erfc(-z / sqrt 2) / 2: no cancellation for z << 0
    return 0.5 * z * _erfc(-z * _SQRT1_2)


def _gelu_grad(z, alpha):
    with np.errstate(invalid="ignore"):
        return 0.5 * _erfc(-z * _SQRT1_2) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)


def _gelu_tanh(z, alpha):
    return 0.5 * z * (1.0 + np.tanh(_GELU_K * (z + _GELU_C * z ** 3)))


def _gelu_tanh_grad(z, alpha):
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.tanh(_GELU_K * (z + _GELU_C * z ** 3))
        sech2 = 1.0 - t * t
        return 0.5 * (1.0 + t) + 0.5 * z * sech2 * _GELU_K * (1.0 + 3 * _GELU_C * z ** 2)


def _sigmoid(z):
    # from exp(-|z|): 0.5 (1 + tanh(z / 2)) cancels for z << 0 (1e-4 relative
    # error at z = -30, 0 from z = -40)
    return _logistic(z)[0]


def _sigmoid_grad(z):
    s, one_minus_s = _logistic(z)
    return s * one_minus_s


def _alpha(alpha, default):
    return default if alpha is None else alpha


# name -> (f(z, alpha), f'(z, alpha)), both from z; fastgrad.registry points here.
ACTIVATIONS = {
    "identity": (lambda z, al: z.copy(), lambda z, al: np.ones_like(z)),
    "relu": (lambda z, al: np.where(z < 0, 0.0, z), lambda z, al: np.where(z <= 0, 0.0, 1.0)),
    "leaky_relu": (lambda z, al: np.where(z < 0, _alpha(al, 0.01) * z, z),
                   lambda z, al: np.where(z > 0, 1.0, _alpha(al, 0.01))),
    "elu": (lambda z, al: np.where(z <= 0, _alpha(al, 1.0) * np.expm1(np.minimum(z, 0)), z),
            lambda z, al: np.where(z <= 0, _alpha(al, 1.0) * np.exp(np.minimum(z, 0)), 1.0)),
    "sigmoid": (lambda z, al: _sigmoid(z), lambda z, al: _sigmoid_grad(z)),
    "tanh": (lambda z, al: np.tanh(z), lambda z, al: 1.0 - np.tanh(z) ** 2),
    # torch's nn.Softplus(beta=1, threshold=20): z itself above 20
    "softplus": (lambda z, al: np.where(z > 20.0, z, np.logaddexp(0.0, z)),
                 lambda z, al: np.where(z > 20.0, 1.0, _sigmoid(z))),
    "gelu": (_gelu, _gelu_grad),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_grad),
    "silu": (lambda z, al: z * _logistic(z)[0],
             lambda z, al: _logistic(z)[0] * (1.0 + z * _logistic(z)[1])),
}


def _pair(name):
    pair = ACTIVATIONS.get(name)
    if pair is None:
        from . import registry          # a registered activation's own reference
        spec = registry.get(name) if isinstance(name, str) else None
        if spec is None or spec.reference is None:
            raise ValueError(f"unknown activation {name!r}"
                             + ("" if spec is None else " (registered without a reference)"))
        pair = spec.reference
    return pair


def activation(z, name, alpha=None):
    """f(z) for the activation ``name``."""
    return _pair(name)[0](np.asarray(z, dtype=np.float64), alpha)


def activation_grad(z, name, alpha=None):
    """f'(z), computed from z (not from the output, unlike the kernels)."""
    return _pair(name)[1](np.asarray(z, dtype=np.float64), alpha)


# --- dense layer -----------------------------------------------------------

def dense_forward(x, W, b, name, alpha=None):
    """Returns (z, a): z = x W + b, a = f(z)."""
    z = np.asarray(x, np.float64) @ np.asarray(W, np.float64) + np.asarray(b, np.float64)
    return z, activation(z, name, alpha)


def dense_backward(x, W, z, da, name, alpha=None):
    """Returns (dW, db, dx) for a = f(x W + b) given da = dL/da."""
    x, W, da = (np.asarray(t, np.float64) for t in (x, W, da))
    dz = da * activation_grad(z, name, alpha)
    return x.T @ dz, dz.sum(axis=0), dz @ W.T


# --- dropout and residual blocks ---------------------------------------------

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_M64 = (1 << 64) - 1


def _fin(z):
    """splitmix64's finalizer on Python ints (exact 64-bit wrap-around)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def dropout_key(seed, layer, counter):
    """The 64-bit key of layer ``layer``'s mask at dropout step ``counter``."""
    k = _fin((seed + _GOLDEN) & _M64)
    k = _fin(((k ^ layer) + _GOLDEN) & _M64)
    return _fin(((k ^ counter) + _GOLDEN) & _M64)


def dropout_mask(seed, layer, counter, shape, p):
    """float64 0/1 keep-mask: element ``e`` (row-major) draws
    ``bits = fin(key + (e + 1) * golden) >> 11``, ``u = bits / 2**53``, and
    is kept iff ``u >= p``."""
    key = dropout_key(seed, layer, counter)
    n = int(np.prod(shape))
    e = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + e * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return (u >= p).astype(np.float64).reshape(shape)


def block_forward(x, W, b, name, alpha=None, mask=None, p=0.0, residual=False):
    """Returns (z, f, y): z = x W + b, f = act(z), y = f * mask / (1 - p)
    (no dropout when ``mask`` is None) plus x for a residual block."""
    z, f = dense_forward(x, W, b, name, alpha)
    y = f if mask is None else f * mask / (1.0 - p)
    if residual:
        y = y + np.asarray(x, np.float64)
    return z, f, y


def block_backward(x, W, z, dy, name, alpha=None, mask=None, p=0.0, residual=False):
    """Returns (dW, db, dx) of :func:`block_forward` given dy = dL/dy."""
    dy = np.asarray(dy, np.float64)
    df = dy if mask is None else dy * mask / (1.0 - p)
    dW, db, dx = dense_backward(x, W, z, df, name, alpha)
    return dW, db, (dx + dy if residual else dx)


# --- LayerNorm / BatchNorm1d ---------------------------------------------------

def norm_forward(z, kind, gamma, beta, running_mean=None, running_var=None, training=True,
                 eps=1e-5, momentum=0.1):
    """``u = gamma * (z - mean) / sqrt(var + eps) + beta``.

    kind "layer": mean and (biased) var over each row's features.  kind
    "batch": over the batch per feature in training (then the running
    statistics move by ``momentum`` towards the mean and the UNBIASED
    variance, as torch.nn.BatchNorm1d), or the running statistics in eval.
    Returns (xhat, u, rstd, running_mean, running_var) (new running arrays).
    """
    z = np.asarray(z, np.float64)
    B = z.shape[0]
    rm = None if running_mean is None else np.asarray(running_mean, np.float64).copy()
    rv = None if running_var is None else np.asarray(running_var, np.float64).copy()
    if kind == "layer":
        mean = z.mean(axis=1, keepdims=True)
        var = z.var(axis=1, keepdims=True)
    elif training:
        mean = z.mean(axis=0)
        var = z.var(axis=0)
        rm = (1 - momentum) * rm + momentum * mean
        rv = (1 - momentum) * rv + momentum * var * B / (B - 1)
    else:
        mean, var = rm, rv
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (z - mean) * rstd
    return xhat, np.asarray(gamma, np.float64) * xhat + np.asarray(beta, np.float64), rstd, rm, rv


def norm_backward(du, xhat, rstd, gamma, kind, training=True):
    """(dz, dgamma, dbeta) of :func:`norm_forward` given du = dL/du."""
    du, xhat, gamma = (np.asarray(t, np.float64) for t in (du, xhat, gamma))
    dgamma, dbeta = (du * xhat).sum(axis=0), du.sum(axis=0)
    dxhat = du * gamma
    if kind == "layer":
        n = du.shape[1]
        dz = rstd * (dxhat - dxhat.sum(axis=1, keepdims=True) / n
                     - xhat * (dxhat * xhat).sum(axis=1, keepdims=True) / n)
    elif training:
        B = du.shape[0]
        dz = rstd * (dxhat - dxhat.sum(axis=0) / B - xhat * (dxhat * xhat).sum(axis=0) / B)
    else:
        dz = rstd * dxhat
    return dz, dgamma, dbeta


# --- weight normalisation -----------------------------------------------------

def weight_norm(v, g):
    """W = g v / ||v|| per column of the (n_in, n_out) v."""
    v = np.asarray(v, np.float64)
    return v * (np.asarray(g, np.float64) / np.sqrt((v * v).sum(axis=0)))


def weight_norm_backward(v, g, dW):
    """(dv, dg) of :func:`weight_norm` given dW = dL/dW."""
    v, g, dW = (np.asarray(t, np.float64) for t in (v, g, dW))
    n = np.sqrt((v * v).sum(axis=0))
    dg = (dW * v).sum(axis=0) / n
    return g / n * dW - g * dg / n ** 2 * v, dg


# --- losses (mean over the batch) -------------------------------------------

def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy on integer labels; returns (loss, dlogits)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    B = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1))
    logp = shifted - lse[:, None]
    loss = -logp[np.arange(B), labels].mean()
    grad = np.exp(logp)
    grad[np.arange(B), labels] -= 1.0
    return loss, grad / B


def mse(pred, target):
    """Mean squared error over all elements (torch.nn.MSELoss); (loss, dpred)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    diff = pred - target
    return np.mean(diff ** 2), 2.0 * diff / diff.size


def bce_with_logits(logits, target):
    """Mean binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss)."""
    x, t = np.asarray(logits, np.float64), np.asarray(target, np.float64)
    loss = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    return loss.mean(), (activation(x, "sigmoid") - t) / x.size


def _reduce(terms, grad, reduction, denom):
    """(loss, grad) of per-term losses under torch's ``reduction``; ``grad``
    is the gradient of the sum of the terms."""
    if reduction == "none":
        return terms, grad
    if reduction == "sum":
        return terms.sum(), grad
    if denom == 0:           # every row ignored: torch's 0/0 loss, zero gradient
        return np.nan, grad
    return terms.sum() / denom, grad / denom


def cross_entropy(logits, labels, weight=None, ignore_index=-100, label_smoothing=0.0,
                  reduction="mean"):
    """torch.nn.functional.cross_entropy on integer labels, with its options;
    returns (loss, dlogits) (loss per row for ``reduction="none"``)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    B, C = logits.shape
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1))[:, None]
    keep = labels != ignore_index
    safe = np.where(keep, labels, 0)
    # coefficient of -log p_c in each row's loss
    coef = np.zeros((B, C))
    coef[np.arange(B), safe] = (1.0 - label_smoothing) * w[safe]
    coef += label_smoothing / C * w[None, :]
    coef[~keep] = 0.0
    terms = -(coef * logp).sum(axis=1)
    grad = coef.sum(axis=1, keepdims=True) * np.exp(logp) - coef
    return _reduce(terms, grad, reduction, w[safe][keep].sum())


def bce_with_logits_ex(logits, target, pos_weight=None, reduction="mean"):
    """torch.nn.functional.binary_cross_entropy_with_logits with
    ``pos_weight`` and ``reduction``; returns (loss, dlogits)."""
    x, t = np.asarray(logits, np.float64), np.asarray(target, np.float64)
    pw = np.ones(x.shape[-1]) if pos_weight is None else np.asarray(pos_weight, np.float64)
    lw = 1.0 + (pw - 1.0) * t
    softplus_neg = np.maximum(-x, 0) + np.log1p(np.exp(-np.abs(x)))
    terms = (1.0 - t) * x + lw * softplus_neg
    grad = lw * activation(x, "sigmoid") - pw * t
    return _reduce(terms, grad, reduction, x.size)


def mse_ex(pred, target, reduction="mean"):
    """torch.nn.functional.mse_loss with ``reduction``; (loss, dpred)."""
    d = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    return _reduce(d * d, 2.0 * d, reduction, d.size)


LOSSES = {"softmax_cross_entropy": softmax_cross_entropy, "mse": mse,
          "bce_with_logits": bce_with_logits}


# --- whole MLP ---------------------------------------------------------------

def mlp_forward(x, layers):
    """``layers``: list of (W, b, activation, alpha).  Returns the list of
    (input, z, a) per layer; the output is the last a."""
    cache, h = [], np.asarray(x, np.float64)
    for W, b, name, alpha in layers:
        z, a = dense_forward(h, W, b, name, alpha)
        cache.append((h, z, a))
        h = a
    return cache


def mlp_backward(cache, layers, dy):
    """Returns [(dW, db)] per layer and dx of the input."""
    grads, d = [], np.asarray(dy, np.float64)
    for (h, z, _), (W, _, name, alpha) in zip(reversed(cache), reversed(layers)):
        dW, db, d = dense_backward(h, W, z, d, name, alpha)
        grads.append((dW, db))
    return grads[::-1], d


# --- optimizers (fastgrad.optim) ---------------------------------------------

def clip_grad(g, clip_norm=None, clip_value=None):
    """``(clipped g, norm before clipping)``; ``(None, norm)`` if non-finite.
    Norm clipping as torch's ``clip_grad_norm_``, then ``clip_grad_value_``."""
    g = np.asarray(g, np.float64)
    norm = float(np.sqrt(np.sum(g * g)))
    if not np.isfinite(norm):
        return None, norm
    if clip_norm is not None:
        g = g * min(1.0, clip_norm / (norm + 1e-6))
    if clip_value is not None:
        g = np.clip(g, -clip_value, clip_value)
    return g, norm


def optimizer_step(kind, p, g, state, t, lr, **h):
    """One update ``t = 1, 2, ...`` of ``kind`` ("sgd", "adam", "adamw",
    "rmsprop") on float64 ``p`` with the (clipped) gradient ``g``, as
    ``torch.optim``'s textbook algorithms.  ``state`` is a dict, updated;
    returns the new ``p``."""
    p = np.asarray(p, np.float64).copy()
    g = np.asarray(g, np.float64)
    wd = h.get("weight_decay", 1e-2 if kind == "adamw" else 0.0)
    if kind == "adamw":
        p = p * (1.0 - lr * wd)
    elif wd:
        g = g + wd * p
    if kind in ("adam", "adamw"):
        b1, b2 = h.get("betas", (0.9, 0.999))
        eps = h.get("eps", 1e-8)
        m = state.get("m", np.zeros_like(p)) * b1 + (1 - b1) * g
        v = state.get("v", np.zeros_like(p)) * b2 + (1 - b2) * g * g
        state["m"], state["v"] = m, v
        if h.get("amsgrad", False):
            v = np.maximum(state.get("vmax", np.zeros_like(p)), v)
            state["vmax"] = v
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        return p - lr * mhat / (np.sqrt(vhat) + eps)
    if kind == "sgd":
        mom, damp = h.get("momentum", 0.0), h.get("dampening", 0.0)
        if mom:
            b = g.copy() if t == 1 else mom * state["b"] + (1 - damp) * g
            state["b"] = b
            g = g + mom * b if h.get("nesterov", False) else b
        return p - lr * g
    if kind == "rmsprop":
        alpha, eps, mom = h.get("alpha", 0.99), h.get("eps", 1e-8), h.get("momentum", 0.0)
        s = alpha * state.get("s", np.zeros_like(p)) + (1 - alpha) * g * g
        state["s"] = s
        if h.get("centered", False):
            a = alpha * state.get("a", np.zeros_like(p)) + (1 - alpha) * g
            state["a"] = a
            d = np.sqrt(s - a * a) + eps
        else:
            d = np.sqrt(s) + eps
        if mom > 0:
            b = mom * state.get("b", np.zeros_like(p)) + g / d
            state["b"] = b
            return p - lr * b
        return p - lr * g / d
    raise ValueError(f"unknown optimizer {kind!r}")

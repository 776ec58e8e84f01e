"""The four whole-step workloads of the TrainStep benchmarks, and their peers.

Every contender runs the same step: forward, loss, backward, clip by global
norm 1.0, Adam(lr=1e-3), all parameters updated, float32.  Each ``make_*``
returns a zero-argument callable that runs one step on fixed data.  The
PyTorch and JAX peers take any built-in activation (through its twin in
``fastgrad.registry``) and any of the three losses, and ``init=``: the
weights to start from (:func:`initial_params`, fastgrad's own initial
weights, so that their losses can be compared with fastgrad's step by step).
"""
import functools

import numpy as np

WORKLOADS = {
    # name: (sizes, batch, activation, loss)
    "tiny": ([32, 64, 64, 1], 64, "tanh", "mse"),
    "mnist": ([784, 256, 256, 10], 128, "relu", "softmax_cross_entropy"),
    "deep": ([256] + [256] * 8 + [10], 256, "tanh", "softmax_cross_entropy"),
    "wide": ([1024, 2048, 2048, 1024], 256, "relu", "mse"),
}
SMOKE_WORKLOADS = {
    "tiny": ([8, 16, 1], 8, "tanh", "mse"),
    "mnist": ([16, 12, 10], 8, "relu", "softmax_cross_entropy"),
    "deep": ([8] + [8] * 3 + [3], 8, "tanh", "softmax_cross_entropy"),
    "wide": ([16, 24, 16], 8, "relu", "mse"),
}


def data(sizes, batch, loss, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    else:
        y = rng.standard_normal((batch, sizes[-1])).astype(np.float32)
        if loss == "bce_with_logits":
            y = (y > 0).astype(np.float32)        # binary targets
    return x, y


def initial_params(sizes, act, seed=0):
    """The initial ``[(W, b), ...]`` (NumPy float32, W as ``(in, out)``) of
    the model :func:`make_fastgrad` builds."""
    import fastgrad as fg
    model = fg.MLP(sizes, activation=act, seed=seed)
    return [(np.array(layer.W), np.array(layer.b)) for layer in model.layers]


def gemm_flops(sizes, batch):
    """FLOPs of the step's GEMMs: forward L, dW L, dx L-1."""
    L = len(sizes) - 1
    f = sum(2 * batch * sizes[i] * sizes[i + 1] for i in range(L))
    return 2 * f + f - 2 * batch * sizes[0] * sizes[1]


def make_fastgrad(sizes, batch, act, loss, device="cpu", cuda_graph=False):
    import fastgrad as fg
    from fastgrad.losses import LOSSES
    model = fg.MLP(sizes, activation=act, seed=0, device=device)
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    step = fg.TrainStep(model, LOSSES[loss](), opt, cuda_graph=cuda_graph)
    x, y = data(sizes, batch, loss)
    if device == "cuda":                   # the batch lives on the GPU, as torch's does
        x, y = model._xp.asarray(x), model._xp.asarray(y)
    run = functools.partial(step, x, y)
    run.train_step = step
    return run


def make_fastgrad_epoch(sizes, batch, act, loss, steps=64, threads=None):
    """``TrainStep.run_epoch`` over ``steps`` batches (the same step, every
    batch gathered from a dataset in compiled code); ``run.steps`` says how
    many steps one call runs, so that timings can be given per step.
    ``threads``: the step's ``threads=`` (batch shards)."""
    import fastgrad as fg
    from fastgrad.losses import LOSSES
    model = fg.MLP(sizes, activation=act, seed=0)
    step = fg.TrainStep(model, LOSSES[loss](), fg.Adam(model, lr=1e-3, clip_norm=1.0),
                        threads=threads)
    X, Y = data(sizes, batch * steps, loss)
    run = functools.partial(step.run_epoch, X, Y, batch, shuffle=False)
    run.train_step, run.steps = step, steps
    return run


def make_update_alone(sizes, batch, act, loss):
    """The step's clipped Adam update alone, as ``opt.step()`` runs it (the
    same kernel and team as the step's, plus its Python call) on gradients
    of the model's size: with the bare GEMMs, the floor of a step whose
    update is memory-bound."""
    import fastgrad as fg
    model = fg.MLP(sizes, activation=act, seed=0)
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        layer.dW[...] = rng.standard_normal(layer.dW.shape).astype(np.float32) * 1e-3
        layer.db[...] = rng.standard_normal(layer.db.shape).astype(np.float32) * 1e-3
    return opt.step


@functools.lru_cache(maxsize=None)
def _gemms_kernel():
    """One compiled call running a step's GEMMs on typed lists of arrays:
    forward h @ W, then per layer backwards dW = h.T @ dz and (but the
    first layer's) dx = dz @ W.T, through the kernels' own GEMM (the
    library ``fastgrad.set_blas`` chose)."""
    from numba import njit
    from fastgrad.kernels.cpu.gemm import gemm

    @njit(cache=True)
    def gemms(hs, Ws, dzs, dWs, dxs):
        for i in range(len(Ws)):
            gemm(hs[i], Ws[i], dzs[i])
        for i in range(len(Ws) - 1, -1, -1):
            gemm(hs[i].T, dzs[i], dWs[i])
            if i > 0:
                gemm(dzs[i], Ws[i].T, dxs[i])
    return gemms


def _gemm_operands(sizes, batch, Ws=None, dWs=None):
    """Typed lists (hs, Ws, dzs, dWs, dxs) for :func:`_gemms_kernel`: random
    inputs, and the given weights and weight gradients (else new arrays)."""
    from numba.typed import List
    rng = np.random.default_rng(0)
    L = len(sizes) - 1
    hs, Wl, dzs, dWl, dxs = List(), List(), List(), List(), List()
    for i in range(L):
        hs.append(rng.standard_normal((batch, sizes[i])).astype(np.float32))
        Wl.append(Ws[i] if Ws is not None else
                  rng.standard_normal((sizes[i], sizes[i + 1])).astype(np.float32))
        dzs.append(np.zeros((batch, sizes[i + 1]), np.float32))
        dWl.append(dWs[i] if dWs is not None else np.zeros((sizes[i], sizes[i + 1]), np.float32))
        dxs.append(np.zeros((batch, sizes[i]), np.float32))
    return hs, Wl, dzs, dWl, dxs


def make_gemm_floor(sizes, batch, act, loss):
    """The step's own GEMMs alone, through the kernels' GEMM, in one call."""
    gemms, operands = _gemms_kernel(), _gemm_operands(sizes, batch)
    return lambda: gemms(*operands)


def make_gemms_then_update(sizes, batch, act, loss):
    """The two parts no step can skip, as a step runs them: its bare GEMMs
    (:func:`make_gemm_floor`'s) writing into the model's own weight
    gradients and reading its weights, then its clipped Adam update
    (``opt.step()``, the step's kernel, plus ~10 us of Python) on that
    memory.  The update then finds in the caches what it finds after a
    step's backward, not what a loop of updates alone leaves there: on
    nets of 1-3M parameters it took 1.3-1.8x its time alone
    (bench/RESULTS.md "The step's floor is its GEMMs then its update")."""
    import fastgrad as fg
    model = fg.MLP(sizes, activation=act, seed=0)
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    Ws, dWs = [layer.W for layer in model.layers], [layer.dW for layer in model.layers]
    if not all(w.flags.c_contiguous and np.shares_memory(w, model.params) for w in Ws) or \
            not all(g.flags.c_contiguous and np.shares_memory(g, model.grads) for g in dWs):
        raise RuntimeError("the floor must run the GEMMs on the model's own weights "
                           "and weight gradients")
    gemms, operands = _gemms_kernel(), _gemm_operands(sizes, batch, Ws, dWs)
    rng = np.random.default_rng(1)
    for layer in model.layers:      # the GEMMs write dW; db as make_update_alone's
        layer.db[...] = rng.standard_normal(layer.db.shape).astype(np.float32) * 1e-3

    def run():
        gemms(*operands)
        opt.step()
    run.model, run.operands = model, operands
    return run


def make_gemm_floor_cuda(sizes, batch, act, loss):
    """The step's own GEMMs alone on cuBLAS (CuPy ``matmul(out=)``)."""
    import cupy as cp
    rng = np.random.default_rng(0)
    L = len(sizes) - 1
    hs = [cp.asarray(rng.standard_normal((batch, sizes[i])).astype(np.float32)) for i in range(L)]
    Ws = [cp.asarray(rng.standard_normal((sizes[i], sizes[i + 1])).astype(np.float32))
          for i in range(L)]
    dzs = [cp.zeros((batch, sizes[i + 1]), np.float32) for i in range(L)]
    dWs = [cp.zeros_like(W) for W in Ws]
    dxs = [cp.zeros_like(h) for h in hs]

    def run():
        for i in range(L):
            cp.matmul(hs[i], Ws[i], out=dzs[i])
        for i in range(L - 1, -1, -1):
            cp.matmul(hs[i].T, dzs[i], out=dWs[i])
            if i > 0:
                cp.matmul(dzs[i], Ws[i].T, out=dxs[i])
    return run


def make_numpy(sizes, batch, act, loss):
    """Plain NumPy float32: the step written the way a NumPy user would."""
    rng = np.random.default_rng(0)
    L = len(sizes) - 1
    Ws = [(rng.standard_normal((sizes[i], sizes[i + 1])) * np.sqrt(2 / sizes[i])).astype(np.float32)
          for i in range(L)]
    bs = [np.zeros(sizes[i + 1], np.float32) for i in range(L)]
    params = Ws + bs
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    x, y = data(sizes, batch, loss)
    f = np.tanh if act == "tanh" else (lambda z: np.maximum(z, 0))
    t = [0]

    def step():
        hs = [x]
        for i in range(L):
            z = hs[-1] @ Ws[i] + bs[i]
            hs.append(f(z) if i < L - 1 else z)
        out = hs[-1]
        if loss == "softmax_cross_entropy":
            e = np.exp(out - out.max(1, keepdims=True))
            p = e / e.sum(1, keepdims=True)
            d = p
            d[np.arange(batch), y] -= 1
            d /= batch
        else:
            d = 2 * (out - y) / out.size
        gW, gb = [None] * L, [None] * L
        for i in range(L - 1, -1, -1):
            if i < L - 1:
                d = d * ((1 - hs[i + 1] ** 2) if act == "tanh" else (hs[i + 1] > 0))
            gW[i] = hs[i].T @ d
            gb[i] = d.sum(0)
            if i:
                d = d @ Ws[i].T
        grads = gW + gb
        norm = np.sqrt(sum(float((g * g).sum()) for g in grads))
        scale = min(1.0, 1.0 / (norm + 1e-6))
        t[0] += 1
        bc1, bc2 = 1 - 0.9 ** t[0], 1 - 0.999 ** t[0]
        for p, g, m, v in zip(params, grads, ms, vs):
            g = g * np.float32(scale)
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= np.float32(1e-3 / bc1) * m / (np.sqrt(v / bc2) + 1e-8)
    return step


def torch_activation(act):
    """A new ``torch.nn`` module for the built-in activation ``act`` (its
    registry twin, alpha at fastgrad's default), None for identity."""
    import torch
    from fastgrad import registry
    spec = registry.get(act)
    if spec is None or spec.torch is None:
        raise ValueError(f"activation {act!r} has no PyTorch twin in fastgrad.registry")
    if spec.torch.module == "Identity":
        return None
    kwargs = dict(spec.torch.kwargs)
    if spec.torch.alpha is not None:
        kwargs[spec.torch.alpha] = spec.alpha
    return getattr(torch.nn, spec.torch.module)(**kwargs)


def jax_activation(act):
    """The JAX function of the built-in activation ``act`` (its registry
    twin; alpha at JAX's default, which is fastgrad's: the peers' step check
    in bench/untuned_compare.py would catch a difference)."""
    import jax
    from fastgrad import registry
    spec = registry.get(act)
    if spec is None:
        raise ValueError(f"unknown activation {act!r}")
    if spec.jax is None:
        if act != "identity":
            raise ValueError(f"activation {act!r} has no JAX twin in fastgrad.registry")
        return lambda z: z
    return functools.partial(getattr(jax.nn, spec.jax.function), **spec.jax.kwargs)


def make_torch(sizes, batch, act, loss, device="cpu", init=None):
    import torch
    torch.manual_seed(0)
    L = len(sizes) - 1
    layers = []
    for i in range(L):
        lin = torch.nn.Linear(sizes[i], sizes[i + 1])
        if init is not None:
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(init[i][0].T)))
                lin.bias.copy_(torch.from_numpy(init[i][1]))
        layers.append(lin)
        f = torch_activation(act) if i < L - 1 else None
        if f is not None:
            layers.append(f)
    return torch_step(torch.nn.Sequential(*layers).to(device), sizes, batch, loss, device)


def torch_step(net, sizes, batch, loss, device="cpu"):
    """One eager PyTorch step of ``net`` (on ``device``): loss, backward,
    clip_grad_norm_(1.0) and Adam(1e-3), fused when this torch build has it,
    else foreach.  On the CPU the step runs with denormals flushed
    (``torch.set_flush_denormal``, on the calling thread for the step's
    span), as fastgrad's float32 kernels and JAX run: its best
    configuration on an Intel core, where a denormal costs ~100 cycles."""
    import torch
    params = list(net.parameters())
    # Probe fused Adam on a throwaway parameter: a probe step on the net's
    # own would move it away from the initial weights the peers share.
    probe = torch.nn.Parameter(torch.zeros(1, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        torch.optim.Adam([probe], lr=1e-3, fused=True).step()
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    lossf = {"softmax_cross_entropy": torch.nn.CrossEntropyLoss, "mse": torch.nn.MSELoss,
             "bce_with_logits": torch.nn.BCEWithLogitsLoss}[loss]()
    xn, yn = data(sizes, batch, loss)
    x, y = torch.from_numpy(xn).to(device), torch.from_numpy(yn).to(device)

    flush = device == "cpu"

    def step():
        if flush:
            torch.set_flush_denormal(True)
        try:
            opt.zero_grad(set_to_none=True)
            out = lossf(net(x), y)
            out.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        finally:
            if flush:
                torch.set_flush_denormal(False)
        return out
    return step


def make_jax(sizes, batch, act, loss, device="cpu", init=None):
    """JAX jit + optax; the step returns its loss (a JAX scalar, ready)."""
    import jax
    import jax.numpy as jnp
    import optax
    where = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    L = len(sizes) - 1
    key = jax.random.PRNGKey(0)
    params = []
    for i in range(L):
        if init is not None:
            params.append((jnp.asarray(init[i][0]), jnp.asarray(init[i][1])))
            continue
        key, sub = jax.random.split(key)
        params.append((jax.random.normal(sub, (sizes[i], sizes[i + 1]), jnp.float32)
                       * np.sqrt(2 / sizes[i]), jnp.zeros(sizes[i + 1], jnp.float32)))
    f = jax_activation(act)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    params = jax.device_put(params, where)
    state = [params, tx.init(params)]
    xn, yn = data(sizes, batch, loss)
    x, y = jax.device_put(jnp.asarray(xn), where), jax.device_put(jnp.asarray(yn), where)

    def loss_fn(ps, x, y):
        h = x
        for i, (W, b) in enumerate(ps):
            h = h @ W + b
            if i < L - 1:
                h = f(h)
        if loss == "softmax_cross_entropy":
            return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()
        if loss == "bce_with_logits":
            return optax.sigmoid_binary_cross_entropy(h, y).mean()
        return jnp.mean((h - y) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))   # update in place, as a tuned user would
    def jstep(ps, os, x, y):
        lv, g = jax.value_and_grad(loss_fn)(ps, x, y)
        upd, os = tx.update(g, os, ps)
        return optax.apply_updates(ps, upd), os, lv

    def step():
        state[0], state[1], lv = jstep(state[0], state[1], x, y)
        return lv.block_until_ready()
    return step


CONTENDERS = {
    "fastgrad": make_fastgrad, "fastgrad-epoch": make_fastgrad_epoch,
    "gemm-floor": make_gemm_floor, "numpy": make_numpy,
    "torch": make_torch, "jax": make_jax,
}

"""The epilogue-piece variants of the deep workload, and their peers.

The deep workload (256 -> 8 x 256 -> 10, batch 256, tanh, softmax
cross-entropy, float32; Adam lr 1e-3 after clipping the global gradient norm
to 1.0) in four variants:

* ``plain``    -- as in bench/workloads.py;
* ``batchnorm`` -- batch norm (training mode: batch statistics, running
  statistics updated) on every hidden layer, before the activation;
* ``residual`` -- every 256 -> 256 hidden layer a residual block,
  ``h + tanh(h W + b)``;
* ``dropout``  -- inverted dropout 0.1 after every hidden activation (a fresh
  mask every step).

Each ``make_*`` returns a zero-argument callable that runs one training step
on fixed data.
"""
import functools

import numpy as np

from workloads import data, torch_step

VARIANTS = ("plain", "batchnorm", "residual", "dropout")
DEEP = ([256] + [256] * 8 + [10], 256, "tanh", "softmax_cross_entropy")
SMOKE_DEEP = ([8] + [8] * 3 + [3], 8, "tanh", "softmax_cross_entropy")
DROPOUT = 0.1


def _layer_kwargs(variant):
    return {"plain": {}, "batchnorm": {"norm": "batch"}, "residual": {"residual": True},
            "dropout": {"dropout": DROPOUT}}[variant]


def make_fastgrad(variant, sizes, batch, act, loss, device="cpu", cuda_graph=False):
    import fastgrad as fg
    from fastgrad.losses import LOSSES
    model = fg.MLP(sizes, activation=act, seed=0, device=device,
                   **_layer_kwargs(variant)).train()
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    step = fg.TrainStep(model, LOSSES[loss](), opt, cuda_graph=cuda_graph)
    x, y = data(sizes, batch, loss)
    x, y = model._xp.asarray(x), model._xp.asarray(y)     # on the device once
    return lambda: step(x, y)


def make_torch(variant, sizes, batch, act, loss, device="cpu"):
    import torch
    torch.manual_seed(0)
    L = len(sizes) - 1
    actf = torch.nn.Tanh if act == "tanh" else torch.nn.ReLU

    class Block(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.lin, self.f = torch.nn.Linear(n, n), actf()

        def forward(self, h):
            return h + self.f(self.lin(h))

    layers = []
    for i in range(L):
        hidden = i < L - 1
        if hidden and variant == "residual" and sizes[i] == sizes[i + 1]:
            layers.append(Block(sizes[i]))
            continue
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if hidden:
            if variant == "batchnorm":
                layers.append(torch.nn.BatchNorm1d(sizes[i + 1]))
            layers.append(actf())
            if variant == "dropout":
                layers.append(torch.nn.Dropout(DROPOUT))
    return torch_step(torch.nn.Sequential(*layers).train().to(device), sizes, batch, loss, device)


def make_jax(variant, sizes, batch, act, loss):
    import jax
    import jax.numpy as jnp
    import optax
    L = len(sizes) - 1
    key = jax.random.PRNGKey(0)
    params, stats = [], []
    for i in range(L):
        key, sub = jax.random.split(key)
        p = {"W": jax.random.normal(sub, (sizes[i], sizes[i + 1]), jnp.float32)
             * np.sqrt(2 / sizes[i]), "b": jnp.zeros(sizes[i + 1], jnp.float32)}
        if variant == "batchnorm" and i < L - 1:
            p["gamma"] = jnp.ones(sizes[i + 1], jnp.float32)
            p["beta"] = jnp.zeros(sizes[i + 1], jnp.float32)
            stats.append((jnp.zeros(sizes[i + 1], jnp.float32), jnp.ones(sizes[i + 1], jnp.float32)))
        params.append(p)
    f = jnp.tanh if act == "tanh" else jax.nn.relu
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    xn, yn = data(sizes, batch, loss)
    x, y = jnp.asarray(xn), jnp.asarray(yn)
    state = [params, tx.init(params), stats, jax.random.PRNGKey(1)]

    def loss_fn(ps, st, x, y, key):
        h, new_st = x, []
        for i, p in enumerate(ps):
            z = h @ p["W"] + p["b"]
            if i == L - 1:
                h = z
                break
            if variant == "batchnorm":
                mu, var = z.mean(0), z.var(0)
                z = (z - mu) * jax.lax.rsqrt(var + 1e-5) * p["gamma"] + p["beta"]
                rm, rv = st[i]
                n = z.shape[0]
                new_st.append((0.9 * rm + 0.1 * mu, 0.9 * rv + 0.1 * var * n / (n - 1)))
            a = f(z)
            if variant == "dropout":
                key, sub = jax.random.split(key)
                keep = jax.random.bernoulli(sub, 1.0 - DROPOUT, a.shape)
                a = jnp.where(keep, a / (1.0 - DROPOUT), 0.0)
            h = h + a if variant == "residual" and sizes[i] == sizes[i + 1] else a
        if loss == "softmax_cross_entropy":
            lv = optax.softmax_cross_entropy_with_integer_labels(h, y).mean()
        else:
            lv = jnp.mean((h - y) ** 2)
        return lv, [jax.lax.stop_gradient(s) for s in new_st]

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def jstep(ps, os, st, key, x, y):
        key, sub = jax.random.split(key)
        (lv, st), g = jax.value_and_grad(loss_fn, has_aux=True)(ps, st, x, y, sub)
        upd, os = tx.update(g, os, ps)
        return optax.apply_updates(ps, upd), os, st, key, lv

    def step():
        state[0], state[1], state[2], state[3], lv = jstep(*state, x, y)
        lv.block_until_ready()
    return step


CONTENDERS = {"fastgrad": make_fastgrad, "torch": make_torch, "jax": make_jax}

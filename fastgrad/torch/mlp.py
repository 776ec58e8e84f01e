"""``FusedMLP``: a ``torch.nn.Module`` MLP on fastgrad's fused dense kernels.

The forward and backward of the whole MLP are one ``torch.autograd.Function``
whose layers run ``fastgrad.kernels.cpu.dense_torch``: per layer one BLAS
GEMM and ONE elementwise pass (bias + activation forward; activation
derivative + bias gradient backward), on the tensors' storage (no copies;
the weights in torch's ``(n_out, n_in)`` layout).  PyTorch's ``nn.Linear`` +
activation module run a GEMM plus separate passes for the bias, the
activation and each derivative.

The module's children are the ``nn.Linear`` and activation modules of the
equivalent ``nn.Sequential`` (the one ``fastgrad.interop.to_torch`` builds for
``fastgrad.MLP``), under the same indices, so ``state_dict`` keys are
``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ... and a state dict moves
between the two unchanged; :meth:`FusedMLP.to_sequential` builds that
``nn.Sequential``.  The children hold the parameters only; ``forward`` runs
the fused kernels, never the children's forwards.
"""
from types import SimpleNamespace

import numpy as np
import torch

from ..interop import _residual_class, _torch_activation
from ..kernels import spec as _spec
from ..kernels.spec import FIRST_CUSTOM_CODE
from ..kernels.cpu import activations as _acts
from ..kernels.cpu import norm as _norm
from ..kernels.cpu.dense_torch import (block_backward_t, block_forward_t, dense_backward_t,
                                       dense_forward_t, norm_backward_t, norm_forward_t)
from ..layers import _dropout_args
from ..ops import resolve_activation
from ._eager import not_traced

__all__ = ["FusedMLP"]


def _children_of(containers):
    """The children of each container, by identity (a residual block's body
    included): a replaced or added child changes its container's; the
    containers themselves are the built tree's, so no walk per forward."""
    return tuple(tuple(m._modules.values()) for m in containers)


def _replaced_forwards(module):
    """The modules under ``module`` whose forwards the kernels replace: all
    but parametrizations (torch runs those when a ``.weight`` is read)."""
    out = []
    for name, child in module.named_children():
        if name != "parametrizations":
            out += [child] + _replaced_forwards(child)
    return out


def _settings(act):
    """An activation module's settings that change its values (not
    ``inplace``, which torch code sets freely): ``(names, values)``."""
    if act is None:
        return None
    names = tuple(k for k in vars(act) if not k.startswith("_")
                  and k not in ("training", "inplace"))
    return names, tuple(getattr(act, k) for k in names)


def _torch_module(name, alpha):
    """The torch module of built-in activation ``name`` (None for identity)."""
    return _torch_activation(SimpleNamespace(activation=name, alpha=alpha), torch)


class _FusedMLPFunction(torch.autograd.Function):
    """``x -> a_L`` through every layer; inputs ``x, plan, drops, train,
    running, *params``.

    ``plan[i] = (code, alpha, residual, norm kind)``; ``drops[i]`` is None
    for a plain layer, else ``(drop, key, thresh, scale)`` of its dropout
    mask (``fastgrad.layers._dropout_args``); ``train``: batch norm uses
    (and updates) the batch statistics; ``running[i]``: batch norm's running
    mean and variance (arrays, updated in place), else None.  ``params``:
    per layer ``weight, bias`` and, for a normalised layer, ``gamma, beta``.
    """

    @staticmethod
    def forward(ctx, x, plan, drops, train, running, *params):
        h = x.detach().numpy()
        saved = []
        k = 0
        for (code, alpha, residual, kind), d, run in zip(plan, drops, running):
            w = params[k].detach().numpy()
            b = params[k + 1].detach().numpy()
            k += 2
            a = np.empty((h.shape[0], w.shape[0]), w.dtype)
            # f(z) apart from the output for a residual block only (blocks.py)
            fz = np.empty_like(a) if residual else a
            if kind:
                gamma = params[k].detach().numpy()
                beta = params[k + 1].detach().numpy()
                k += 2
                ns = a.shape[0] if kind == _norm.LAYER else a.shape[1]
                xhat = np.empty_like(a)
                mean, rstd = np.empty(ns, a.dtype), np.empty(ns, a.dtype)
                acc = np.empty(2 * a.shape[1])
                rm, rv = run if run is not None else (acc[:0], acc[:0])
                norm_forward_t(h, w, b, xhat, fz, a, gamma, beta, mean, rstd, acc, rm, rv, kind,
                               train, code, alpha, *d, residual)
                saved.append((h, xhat, rstd, fz))
            else:
                z = np.empty_like(a) if code in _acts.NEEDS_Z else a
                if d is None:
                    dense_forward_t(h, w, b, z, a, code, alpha)
                else:
                    block_forward_t(h, w, b, z, fz, a, code, alpha, *d, residual)
                saved.append((h, z, fz))
            h = a
        out = torch.from_numpy(h)
        ctx.plan, ctx.drops, ctx.train = plan, drops, train
        # the layers' arrays go to torch as tensors over the kernels' own
        # buffers (no copy), so that torch frees them after the backward, as
        # it frees nn.Linear's (kept on ctx, a kept loss held them all); x
        # too, though backward reads it from them: torch then refuses a
        # backward after x was changed in place, as nn.Linear's saved input
        # does, instead of a silently wrong dW
        ctx.hidden_counts = [len(arrays) for arrays in saved]
        ctx.save_for_backward(x, *params, out,
                              *(torch.from_numpy(a) for arrays in saved for a in arrays))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, a Hessian): the kernels'
            # dx carries no graph, so its own gradients would silently be 0
            # (@once_differentiable refuses only a grad_out that needs grad)
            raise RuntimeError(
                "FusedMLP's backward is not differentiable: double backward "
                "(create_graph=True, torch.autograd.functional.hessian, gradient "
                "penalties) needs FusedMLP.to_sequential()")
        return _FusedMLPFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        saved = ctx.saved_tensors           # x (checked by torch), params, out, the layers'
        n_params = sum(4 if kind else 2 for *_, kind in ctx.plan)
        params, out = saved[1:1 + n_params], saved[1 + n_params]
        flat = [t.numpy() for t in saved[2 + n_params:]]
        hidden, pos = [], 0
        for count in ctx.hidden_counts:
            hidden.append(tuple(flat[pos:pos + count]))
            pos += count
        da = grad_out.detach()
        if da.dtype != out.dtype:
            da = da.to(out.dtype)
        da = da.contiguous().numpy()       # read only: dz gets its own buffer
        grads = [None] * len(params)
        starts = np.cumsum([0] + [4 if kind else 2 for *_, kind in ctx.plan])
        dx = None
        for i in range(len(ctx.plan) - 1, -1, -1):
            code, alpha, residual, kind = ctx.plan[i]
            d, k = ctx.drops[i], starts[i]
            w = params[k].numpy()
            x = hidden[i][0]
            dz = np.empty_like(da)
            dw = np.empty_like(w)
            db = np.empty(w.shape[0], w.dtype)
            need_dx = i > 0 or ctx.needs_input_grad[0]
            dx = np.empty_like(x) if need_dx else dz[:0, :0]
            if kind:
                _, xhat, rstd, fz = hidden[i]
                gamma, beta = params[k + 2].numpy(), params[k + 3].numpy()
                dg, dbt = np.empty_like(gamma), np.empty_like(beta)
                r1, r2 = np.empty(x.shape[0]), np.empty(x.shape[0])
                norm_backward_t(x, w, fz, xhat, gamma, beta, rstd, da, dz, dw, db, dg, dbt, dx,
                                r1, r2, kind, ctx.train, code, alpha, *d, residual, need_dx)
                grads[k + 2] = torch.from_numpy(dg)
                grads[k + 3] = torch.from_numpy(dbt)
            elif d is None:
                _, z, a = hidden[i]         # fz is the output a here
                dense_backward_t(x, w, a, z, da, dz, dw, db, dx, code, alpha, need_dx)
            else:
                _, z, fz = hidden[i]
                block_backward_t(x, w, fz, z, da, dz, dw, db, dx, code, alpha, *d, residual,
                                 need_dx)
            grads[k] = torch.from_numpy(dw)
            grads[k + 1] = torch.from_numpy(db)
            da = dx
        dx = torch.from_numpy(dx) if ctx.needs_input_grad[0] else None
        return (dx, None, None, None, None, *grads)


class FusedMLP(torch.nn.Module):
    """A multilayer perceptron whose forward and backward are fastgrad's fused
    dense kernels, as a ``torch.nn.Module`` (CPU, float32/float64).

    Parameters
    ----------
    sizes : sequence of int
        ``[n_in, hidden..., n_out]`` (at least two entries, all >= 1).
    activation : str
        Hidden activation, a built-in one (``fastgrad.kernels.spec.CODES``:
        each has a torch module); an activation registered with
        ``fastgrad.register_activation`` runs in fastgrad's own models.
    output_activation : str or None
        Activation of the last layer (None: identity, e.g. logits).
    alpha : float or None
        Parameter of leaky_relu / elu (None: their defaults).
    dtype : torch.float32 (default) or torch.float64
        The parameters' dtype.
    dropout : float
        Inverted dropout after every hidden layer's activation, in training
        mode (``module.train()``), as ``nn.Dropout(dropout)``; the masks are
        fastgrad's (counter-based, drawn from ``seed`` and the module's
        ``dropout_step``), so they differ from torch's own draws.  The
        ``nn.Dropout`` children's ``p`` is read at each forward (set it, or
        ``module.dropout``, to change the rate).  Activation checkpointing
        (``torch.utils.checkpoint``) cannot replay these masks: refused in
        training mode with dropout.
    residual : bool
        Wrap every hidden layer whose width does not change in a residual
        block ``x + layer(x)``, as ``fastgrad.MLP(residual=True)``.
    norm : None, "layer" or "batch"
        ``nn.LayerNorm`` / ``nn.BatchNorm1d`` (eps 1e-5, momentum 0.1, the
        running statistics in the module's buffers) after every hidden
        layer's Linear, before its activation, as ``fastgrad.MLP(norm=)``.
    weight_norm : bool
        Weight-normalise every Linear (``W = g v / ||v||`` per output unit)
        with ``torch.nn.utils.parametrizations.weight_norm``, as
        ``fastgrad.MLP(weight_norm=True)`` and its ``to_torch()``: the
        reparametrisation runs in torch (its cost is one pass over the
        weights), the layers in fastgrad's kernels.
    seed : int or None
        Seed of the dropout masks (None: drawn from torch's generator after
        the weights, so ``torch.manual_seed`` fixes it).

    Notes
    -----
    The weights start as in ``nn.Linear`` (Kaiming-uniform; seed with
    ``torch.manual_seed``).  Inputs are ``(..., n_in)`` tensors of the
    module's dtype on the CPU (2-D with batch norm, as ``nn.BatchNorm1d``
    after ``nn.Linear``); other dtypes or devices raise TypeError.  The
    children's other settings (an activation's slope, the modules
    themselves) are the kernels': a change is refused at the next forward,
    as are hooks on the children, which would never run (hook the module
    itself).  Under ``torch.compile`` the forward is a graph break (it runs
    eagerly); under ``torch.autocast`` it computes in the parameters' dtype;
    ``torch.func`` transforms (vmap, grad) are not supported: use
    :meth:`to_sequential` for those.
    The backward is not itself differentiable: a double backward
    (``create_graph=True``: Hessians, gradient penalties) raises
    RuntimeError; :meth:`to_sequential` gives the module that supports it.
    """

    def __init__(self, sizes, activation="relu", output_activation=None, alpha=None,
                 dtype=torch.float32, dropout=0.0, residual=False, norm=None,
                 weight_norm=False, seed=None):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer))
                                 or n < 1 for n in sizes):
            raise ValueError(f"sizes must be at least two integers >= 1, got {sizes!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating)):
            raise TypeError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        for name, flag in (("residual", residual), ("weight_norm", weight_norm)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if norm not in _norm.KINDS:
            raise ValueError(f'norm must be None, "layer" or "batch", got {norm!r}')
        hidden = resolve_activation(activation, alpha)
        last = resolve_activation(output_activation, alpha)
        for name, (code, _) in ((activation, hidden), (output_activation, last)):
            if code >= FIRST_CUSTOM_CODE:
                raise ValueError(f"FusedMLP runs fastgrad's built-in activations "
                                 f"{sorted(_spec.CODES)}; {name!r} is a registered one: "
                                 "use it in fastgrad's own models (fg.MLP)")
        n = len(sizes) - 1
        square = [i for i in range(n - 1) if sizes[i] == sizes[i + 1]]
        if residual and not square:
            raise ValueError(f"residual=True needs hidden layers of equal consecutive widths "
                             f"(n_in == n_out), got sizes {sizes}")
        self.sizes = [int(v) for v in sizes]
        self.activation, self.output_activation = activation, output_activation
        self.residual, self.norm = bool(residual), norm
        self.weight_norm = bool(weight_norm)
        self.dropout_step = 0
        names = [activation] * (n - 1) + [output_activation or "identity"]
        codes = [hidden] * (n - 1) + [last]
        rates = [float(dropout) if i < n - 1 else 0.0 for i in range(n)]
        kind = _norm.KINDS[norm]
        self._plan = tuple((code, a, residual and i in square, kind if i < n - 1 else 0)
                           for i, (code, a) in enumerate(codes))
        self._linears, self._norms, self._acts, self._drop_mods = [], [], [], []
        # the children of fastgrad.interop.to_torch(fastgrad.MLP(...)):
        # Linear, norm, activation, Dropout; residual layers in a ResidualBlock
        mods = []
        for i in range(n):
            lin = torch.nn.Linear(sizes[i], sizes[i + 1], dtype=dtype)
            if weight_norm:
                lin = torch.nn.utils.parametrizations.weight_norm(lin, dim=0)
            self._linears.append(lin)
            layer = [lin]
            nm = None
            if self._plan[i][3]:
                nm = (torch.nn.LayerNorm(sizes[i + 1], dtype=dtype) if norm == "layer"
                      else torch.nn.BatchNorm1d(sizes[i + 1], dtype=dtype))
                layer.append(nm)
            self._norms.append(nm)
            act = _torch_module(names[i], codes[i][1])
            if act is not None:
                layer.append(act)
            self._acts.append(act)
            self._drop_mods.append(torch.nn.Dropout(rates[i]) if rates[i] > 0
                                   else None)
            if self._drop_mods[i] is not None:
                layer.append(self._drop_mods[i])
            if self._plan[i][2]:        # residual
                mods.append(_residual_class()(torch.nn.Sequential(*layer)))
            else:
                mods.extend(layer)
        for i, m in enumerate(mods):
            self.add_module(str(i), m)
        # what the kernels were built for: checked at each forward
        self._act_settings = [_settings(a) for a in self._acts]
        self._containers = [m for m in self.modules() if m._modules]
        self._children_built = _children_of(self._containers)
        self._not_called = _replaced_forwards(self)
        if seed is None:
            # drawn after the weights, and only when used, so that the weights
            # equal those of the same nn.Sequential built after the same
            # torch.manual_seed
            seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if dropout > 0 else 0
        self.seed = int(seed)

    @property
    def dropout(self):
        """The hidden layers' dropout rate, as their ``nn.Dropout`` children
        say (a tuple of their rates where they differ); setting it sets
        their ``p`` (a module built without dropout has none to set)."""
        rates = [float(d.p) for d in self._drop_mods if d is not None]
        if not rates:
            return 0.0
        return rates[0] if len(set(rates)) == 1 else tuple(rates)

    @dropout.setter
    def dropout(self, p):
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) \
                or not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
        mods = [d for d in self._drop_mods if d is not None]
        if not mods and p > 0:
            raise ValueError("this FusedMLP was built without dropout (it has no nn.Dropout "
                             "children); build it with dropout=p")
        for d in mods:
            d.p = float(p)

    def _child_rates(self):
        """Each layer's dropout rate as its ``nn.Dropout`` child says now
        (torch code sets ``p`` in place); children replaced, activations
        changed or children hooked, which the kernels would ignore, are
        refused."""
        if _children_of(self._containers) != self._children_built:
            raise ValueError("FusedMLP's child modules were replaced; its kernels run the "
                             "layers it was built with (to_sequential() runs any)")
        for m in self._not_called:
            if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks \
                    or getattr(m, "_backward_pre_hooks", None):
                raise ValueError(
                    f"FusedMLP runs its layers in fused kernels, not its children's "
                    f"forwards: the hooks on its child {type(m).__name__} would never run "
                    "(torch.nn.utils.weight_norm, spectral_norm and pruning are such "
                    "hooks; torch.nn.utils.parametrizations work).  Hook the FusedMLP "
                    "itself, or use to_sequential()")
        for act, built in zip(self._acts, self._act_settings):
            if act is not None and tuple(act.__dict__.get(k) for k in built[0]) != built[1]:
                was = ", ".join(f"{k}={v!r}" for k, v in zip(*built))
                raise ValueError(f"FusedMLP's kernels run the activations it was built with; "
                                 f"{type(act).__name__}({was}) was changed to {act!r} "
                                 "(build a new FusedMLP, or to_sequential() runs any)")
        rates = []
        for d in self._drop_mods:
            p = 0.0 if d is None else float(d.p)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"FusedMLP's dropout must be in [0, 1), a child has p={p}")
            rates.append(p)
        return rates

    def _drops(self, counter, rates=None):
        """Per layer: None (plain kernels) or the block kernels' dropout
        arguments for masks drawn at ``counter`` (None: no dropout), at the
        children's ``rates`` (None: read now)."""
        if rates is None:
            rates = self._child_rates()
        out = []
        for l, ((_, _, residual, kind), p) in enumerate(zip(self._plan, rates)):
            drop = counter is not None and p > 0
            if not (drop or residual or kind):
                out.append(None)
                continue
            key, thresh, scale = _dropout_args(self.seed, l, counter, p if drop else 0.0)
            out.append((drop, key, thresh, scale))
        return tuple(out)

    @not_traced
    def forward(self, x):
        wb = []
        train = self.training
        for lin, nm in zip(self._linears, self._norms):
            # (a weight-normalised Linear computes .weight from g and v here,
            # differentiably: their gradients come back through torch)
            wb += [lin.weight, lin.bias]
            if nm is not None:
                wb += [nm.weight, nm.bias]
        bufs = [t for nm in self._norms if isinstance(nm, torch.nn.BatchNorm1d)
                for t in (nm.running_mean, nm.running_var)]
        for nm in self._norms:
            # the kernels' constants: a changed child module would be ignored
            if nm is not None and (nm.eps != _norm.EPS or (
                    isinstance(nm, torch.nn.BatchNorm1d) and nm.momentum != _norm.MOMENTUM)):
                raise ValueError(f"FusedMLP's kernels normalise with eps {_norm.EPS} and "
                                 f"momentum {_norm.MOMENTUM}; a norm module was given "
                                 f"eps {nm.eps}, momentum {getattr(nm, 'momentum', None)} "
                                 "(to_sequential() runs any)")
        dt = wb[0].dtype
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedMLP expects a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu" or any(t.device.type != "cpu" for t in wb + bufs):
            where = sorted({str(t.device) for t in wb + bufs})
            raise TypeError(f"FusedMLP runs on the CPU; got an input on {x.device}, "
                            f"parameters and buffers on {', '.join(where)}")
        if dt not in (torch.float32, torch.float64) or x.dtype != dt or \
                any(t.dtype != dt for t in wb + bufs):
            raise TypeError(f"FusedMLP: input dtype {x.dtype}, parameters "
                            f"{sorted({str(t.dtype) for t in wb})}; expected one of "
                            "torch.float32 / torch.float64 for all")
        n_in = self.sizes[0]
        if x.ndim < 1 or x.shape[-1] != n_in:
            raise ValueError(f"FusedMLP: expected input shape (..., {n_in}), got "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n_in).contiguous()
        if x2.shape[0] == 0:
            # nothing to compute: the equivalent torch modules give the empty
            # output, zero gradients and the norm's batch count, as nn.Sequential
            out = x2
            for m in self.children():
                out = m(out)
            return out.reshape(*lead, self.sizes[-1])
        if self.norm == "batch" and x.ndim != 2:
            # nn.BatchNorm1d reads a 3-D input as (N, C, L), channels in dim
            # 1, not the last: its Sequential would normalise other numbers
            raise ValueError(f"FusedMLP with batch norm takes a 2-D input (batch, {n_in}), "
                             f"as nn.BatchNorm1d after nn.Linear does; got {tuple(x.shape)} "
                             "(flatten the leading dimensions first)")
        if train and self.norm == "batch" and x2.shape[0] == 1:
            raise ValueError("batch norm in training mode needs more than 1 sample per batch "
                             "(got a batch of 1), as in PyTorch; use module.eval()")
        running = tuple((nm.running_mean.numpy(), nm.running_var.numpy())
                        if isinstance(nm, torch.nn.BatchNorm1d) else None for nm in self._norms)
        counter = None
        rates = self._child_rates()
        if self.training and any(rates):
            if torch._C._current_graph_task_id() != -1:
                # a forward run inside a backward: activation checkpointing's
                # recompute.  The masks come from the module's counter, not
                # torch's RNG state that checkpoint restores, so the recompute
                # would draw new ones (gradients 0.24-0.29 off, silently)
                raise RuntimeError(
                    "FusedMLP's dropout masks come from its own counter, which "
                    "torch.utils.checkpoint's recompute cannot replay: checkpoint "
                    "FusedMLP.to_sequential(), or this module with dropout 0 or in eval mode")
            counter, self.dropout_step = self.dropout_step, self.dropout_step + 1
        out = _FusedMLPFunction.apply(x2, self._plan, self._drops(counter, rates), train, running,
                                      *(t.contiguous() for t in wb))
        if train and self.norm == "batch":
            for nm in self._norms:          # as BatchNorm1d counts its training batches
                if nm is not None:
                    nm.num_batches_tracked.add_(1)
        return out.reshape(*lead, self.sizes[-1])

    def to_sequential(self):
        """The equivalent ``torch.nn.Sequential`` (a deep copy of the children:
        the same modules, weights and ``state_dict`` keys)."""
        import copy
        return torch.nn.Sequential(*(copy.deepcopy(m) for m in self.children()))

    def extra_repr(self):
        return (f"sizes={self.sizes}, activation={self.activation!r}, "
                f"output_activation={self.output_activation!r}, dropout={self.dropout}, "
                f"residual={self.residual}, norm={self.norm!r}, weight_norm={self.weight_norm}")

"""``torch.optim`` optimizers whose step is fastgrad's fused, clipped update.

See the package docstring (``fastgrad.torch``).  Parity: with float64
tensors a trajectory equals ``clip_grad_norm_`` (+ ``clip_grad_value_``) +
``torch.optim.X`` to rounding (tests/test_torch_backend.py checks 1e-12),
because the kernel is written operation by operation as PyTorch's
single-tensor implementations (``fastgrad.kernels.cpu.optim``).
"""
import numpy as np
import torch

from ..errors import NonFiniteGradientError
from ..kernels import spec as _spec
from ..kernels.cpu import multi_tensor as _mt
from ..kernels.cpu import optim as _k
from ..optim import _CHECKS, _TORCH_NOOP_FLAGS, StepStats, _check_torch_flags, _clip_arg, _flag, \
    _nonneg
from ._eager import not_traced

__all__ = ["Adam", "AdamW", "SGD", "RMSprop"]

_DTYPES = (torch.float32, torch.float64)
_LIKE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _lr(group):
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor, got shape "
                             f"{tuple(lr.shape)}")
        lr = lr.item()
    return _nonneg("lr", lr)


def _check_param(p, where):
    """A parameter the kernel can update in place, or TypeError/ValueError."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
    if p.device.type != "cpu":
        raise TypeError(f"{where}: fastgrad.torch updates CPU tensors, got a tensor on "
                        f"{p.device} (use torch.optim's own fused optimizers there)")
    if p.dtype not in _DTYPES:
        raise TypeError(f"{where}: dtype {p.dtype} is not supported; expected torch.float32 "
                        "or torch.float64")
    if p.layout is not torch.strided:
        raise ValueError(f"{where}: the tensor must be dense (strided), got layout {p.layout}")
    if not p.is_contiguous():
        raise ValueError(f"{where}: the tensor must be contiguous (shape {tuple(p.shape)}, "
                         f"strides {p.stride()}); call .contiguous() on the data first")


class _FusedOptimizer(torch.optim.Optimizer):
    """The step shared by every rule; a subclass names its update rules.

    ``opt.parallel = True`` runs both passes on Numba's threads (bitwise
    the same result; off by default: next to PyTorch's own intra-op thread
    pool a parallel region can lose more than it gains, see bench/RESULTS.md).

    ``_rules``: the names of the update rules the class runs (rows of
    kernels/spec.py ``UPDATE_RULES`` with one torch class, one state layout
    and one set of hyper-parameters); when there are several, torch's keys
    that tell them apart (Adam's ``decoupled_weight_decay``) pick one.
    Everything else is derived from their spec rows when the class is made:
    ``_names``, the torch state names in the kernel's slot order (s0, s1,
    s2; see ``fastgrad.kernels.cpu.optim``); ``_counts_steps``, whether torch
    keeps ``state["step"]`` for the rule; the hyper-parameters' validators.
    """

    _rules = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        rows = [_spec.UPDATE_RULES[_spec.RULES[name]] for name in cls._rules]
        first = rows[0]
        cls._names = tuple(st.name for st in first.state)
        cls._counts_steps = first.torch.counts_steps
        cls._hyper = tuple((h.name, h.check, _CHECKS[h.check]) for h in first.hyper)
        cls._uses_step = bool(first.per_update)
        # torch's group keys that tell the rules apart, and each rule's values of them
        cls._selectors = tuple(k for k in first.torch.group_keys if k not in _TORCH_NOOP_FLAGS)
        cls._by_selectors = {tuple(r.torch.group_keys[k] for k in cls._selectors):
                             _spec.RULES[r.name] for r in rows}

    def __init__(self, params, defaults, clip_norm, clip_value, skip_nonfinite):
        _check_torch_flags({k: defaults[k] for k in ("foreach", "fused", "capturable",
                                                     "differentiable") if k in defaults})
        self.clip_norm = _clip_arg("clip_norm", clip_norm)
        self.clip_value = _clip_arg("clip_value", clip_value)
        self.skip_nonfinite = _flag("skip_nonfinite", skip_nonfinite)
        self.stats = None
        self.parallel = False
        self.n_updates = 0
        self.n_skipped = 0
        self._dtype = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """torch's ``add_param_group``; the tensors must be contiguous CPU
        float32/float64 tensors of one dtype (TypeError/ValueError)."""
        params = param_group["params"]
        if isinstance(params, set):
            return super().add_param_group(param_group)      # torch refuses sets
        # a generator is read once here: torch gets the list
        params = param_group["params"] = ([params] if isinstance(params, torch.Tensor)
                                          else list(params))
        for i, p in enumerate(params):
            if isinstance(p, tuple) and len(p) == 2:     # torch's named parameters
                p = p[1]
            _check_param(p, f"parameter {i} of group {len(self.param_groups)}")
            if self._dtype is None:
                self._dtype = p.dtype
            elif p.dtype != self._dtype:
                raise TypeError(f"parameter {i} of group {len(self.param_groups)} is "
                                f"{p.dtype}, the others {self._dtype}: one optimizer updates "
                                "one dtype (build one optimizer per dtype)")
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            # refused whole: the optimizer stays as it was, usable
            self.param_groups.pop()
            raise

    # fastgrad's settings and counters, kept with torch's three entries when
    # the optimizer is pickled or deep-copied (a spawn worker, a snapshot)
    # (with the values an optimizer pickled without them takes)
    _OWN = dict(clip_norm=None, clip_value=None, skip_nonfinite=True, stats=None, parallel=False,
                n_updates=0, n_skipped=0, _dtype=None)

    def __getstate__(self):
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._OWN if k in self.__dict__})
        return state

    def __setstate__(self, state):
        # also torch's load_state_dict's way in, with state and groups alone
        super().__setstate__(state)
        for k, default in self._OWN.items():
            self.__dict__.setdefault(k, default)
        if self._dtype is None:
            self._dtype = next((p.dtype for g in self.param_groups for p in g["params"]), None)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        # older torch state dicts keep "step" as a number: torch's own
        # optimizers turn it into a float32 scalar tensor on load, as here
        for st in self.state.values():
            if "step" in st and not isinstance(st["step"], torch.Tensor):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    # -- what the rule's spec says -------------------------------------------------
    def _check_group(self, group):
        """Validate a group's hyper-parameters (ValueError/TypeError naming
        them); returns the rule's own as checked values."""
        _lr(group)
        _flag("maximize", group["maximize"])
        for key in self._selectors:
            _flag(key, group[key])
            if group[key] != self.param_groups[0][key]:
                raise ValueError(f"{key} must be the same in every group (one fused update "
                                 "runs one rule)")
        values = {}
        for name, kind, check in self._hyper:
            x = group[name]
            if kind == "betas" and isinstance(x, (tuple, list)):
                x = tuple(float(b) for b in x)      # torch accepts tensors there
            values[name] = check(name, x)
        _spec.check_rule_values(self._rule(), values)
        return values

    def _new_state(self, p, values):
        """The state torch creates for ``p`` at its first step: with a step
        count, the step and the buffers; without (SGD), nothing yet -- its
        buffers are made at the step, their absence telling the first one."""
        if not self._counts_steps:
            return {}
        st = {"step": torch.tensor(0.0, dtype=torch.float32)}
        for name in self._wanted(values):
            st[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return st

    def _wanted(self, values):
        return _spec.rule_state(self._rule(), values)

    def _row_key(self, state):
        """The update number ``t`` of the tensor's next update, which with
        its group selects its hp row (0 when the rule does not read it)."""
        if not self._uses_step:
            return 0.0
        if self._counts_steps:
            return float(state["step"]) + 1.0       # torch increments step before using it
        return 1.0 if all(state.get(n) is None for n in self._names) else 2.0

    def _rule(self):
        group = self.param_groups[0]
        return self._by_selectors[tuple(bool(group[k]) for k in self._selectors)]

    def _refuse(self, ps, gs, first):
        """Raise the precise error for the first unusable parameter or gradient."""
        dt = self._dtype
        for i, (p, g) in enumerate(zip(ps, gs)):
            where = f"parameter {first + i}"
            _check_param(p, where)
            if p.dtype is not dt:
                raise TypeError(f"{where}: dtype changed to {p.dtype} (optimizer built "
                                f"for {dt})")
            _check_param(g, f"{where}'s gradient")
            if g.is_neg():      # a lazily negated view: its storage holds -g
                raise ValueError(f"{where}'s gradient is a negative view; pass "
                                 "grad.resolve_neg()")
            if g.dtype is not dt or g.numel() != p.numel():
                raise ValueError(f"{where}'s gradient: dtype {g.dtype}, shape "
                                 f"{tuple(g.shape)}; expected {dt}, {tuple(p.shape)}")
        raise AssertionError("unreachable")     # pragma: no cover

    def _refuse_state(self, name, ts, ns, first):
        for i, (t, n) in enumerate(zip(ts, ns)):
            if not (t.dtype is self._dtype and t.is_cpu and t.is_contiguous()
                    and t.numel() == n):
                raise ValueError(f"parameter {first + i}: state {name!r} is a {t.dtype} tensor "
                                 f"of shape {tuple(t.shape)} on {t.device}; expected a "
                                 f"contiguous {self._dtype} CPU tensor of {n} items")

    @staticmethod
    def _float_steps(states):
        """The states' step counts as floating scalar tensors: a number or
        an integer tensor becomes the float32 scalar torch's own optimizers
        keep; anything else raises before the update."""
        steps = []
        for st in states:
            t = st["step"]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                if isinstance(t, torch.Tensor) and (t.numel() != 1 or t.is_complex()
                                                    or t.dtype is torch.bool):
                    raise ValueError(f"state 'step' must be a scalar count, got {t!r}")
                t = st["step"] = torch.tensor(float(t), dtype=torch.float32)
            elif t.numel() != 1 or not t.is_cpu:
                raise ValueError(f"state 'step' must be a scalar CPU tensor, got {t!r}")
            steps.append(t)
        return steps

    # -- the step -----------------------------------------------------------------
    def _gather(self, params, grads, states, rows, keys, new, made, slots, group_values):
        """The step's tensors, state rows and buffers, group by group;
        states and buffers made here are listed in ``new`` and ``made``."""
        dt, all_state = self._dtype, self.state
        for gi, group in enumerate(self.param_groups):
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            values = group_values[gi] = self._check_group(group)
            gs = [p.grad for p in ps]
            ns = [p.numel() for p in ps]
            # p.data and p.grad can be replaced at any time: checked at every step
            if not (all(p.dtype is dt and p.is_cpu and p.is_contiguous() for p in ps)
                    and all(g.dtype is dt and g.is_cpu and not g.is_sparse and g.is_contiguous()
                            and g.numel() == n and not g.is_neg() for g, n in zip(gs, ns))):
                self._refuse(ps, gs, len(params))
            sts = [all_state[p] for p in ps]
            for p, st in zip(ps, sts):
                if not st:
                    st.update(self._new_state(p, values))
                    new.append(p)
            for st in sts:                # read before any buffer is made below
                key = (gi, self._row_key(st))
                rows.append(keys.setdefault(key, len(keys)))
            wanted = self._wanted(values)
            for j, name in enumerate(self._names + (None,) * (len(slots) - len(self._names))):
                if name not in wanted:
                    slots[j].extend([0] * len(ps))
                    continue
                ts = [st.get(name) for st in sts]
                for i, t in enumerate(ts):
                    if t is None:
                        # a buffer torch makes at this step (SGD's momentum
                        # buffer; one a changed hyper-parameter now needs)
                        ts[i] = sts[i][name] = torch.zeros_like(
                            ps[i], memory_format=torch.contiguous_format)
                        made.append((sts[i], name))
                if not all(t.dtype is dt and t.is_cpu and t.is_contiguous() and t.numel() == n
                           for t, n in zip(ts, ns)):
                    self._refuse_state(name, ts, ns, len(params))
                slots[j].extend([t.data_ptr() for t in ts])
            params += ps
            grads += gs
            states += sts

    def _drop_made(self, new, made):
        for st, name in made:
            st.pop(name, None)
        for p in new:
            self.state.pop(p, None)

    @not_traced
    @torch.no_grad()
    def step(self, closure=None):
        """One clipped update of every parameter that has a gradient.

        Parameters whose ``grad`` is None are left alone (as torch does) and
        take no part in the global norm (as in ``clip_grad_norm_``).

        Returns
        -------
        The closure's loss, or None.  The step's :class:`fastgrad.StepStats`
        is ``opt.stats`` (``layer_norms``: one norm per parameter with a
        gradient, in ``param_groups`` order).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One pass per group over its parameters with a gradient, written as
        # comprehensions: at 64 tensors the Python bookkeeping would cost
        # as much as the kernel's pass over 1M parameters otherwise.
        params, grads, states, rows, keys, new, made = [], [], [], [], {}, [], []
        slots = tuple([] for _ in range(_spec.N_STATE_SLOTS))
        dt = self._dtype
        group_values = {}
        try:
            self._gather(params, grads, states, rows, keys, new, made, slots, group_values)
        except BaseException:
            self._drop_made(new, made)      # a refused step leaves no state behind
            raise
        if not params:
            return loss
        hp = np.zeros((len(keys), _k.HP_SIZE), np.float64)
        rule = self._rule()
        for (gi, t), r in keys.items():
            group = self.param_groups[gi]
            hp[r, _k.HP_LR] = _lr(group)
            hp[r, _k.HP_MAXIMIZE] = float(group["maximize"])
            _spec.fill_hp(rule, hp[r], group_values[gi], t)
        steps = None
        if self._counts_steps:
            # torch's step tensors are float32 scalars: one compiled call
            # adds 1 to all after the update (a torch op per tensor costs
            # ~5 us each).  Others are made addable before the update
            # writes anything: an int64 step (a state dict's) made
            # torch._foreach_add_ fail after the parameters had moved.
            steps = [s["step"] for s in states]
            fast = all(t.dtype is torch.float32 and t.is_cpu and t.numel() == 1 for t in steps)
            if not fast:
                steps = self._float_steps(states)
        n = len(params)
        sizes = np.array([p.numel() for p in params], np.int64)
        p_addr = np.array([p.data_ptr() for p in params], np.int64)
        g_addr = np.array([g.data_ptr() for g in grads], np.int64)
        s_addr = np.array(slots, np.int64)
        tensor_sq = np.zeros(n, np.float64)
        update = _mt.multi_clipped_update_parallel if self.parallel else _mt.multi_clipped_update
        norm, scale, skipped = update(
            rule, _LIKE[dt], p_addr, g_addr, s_addr, sizes, hp,
            np.asarray(rows, np.int64), tensor_sq, self.clip_norm or 0.0,
            self.clip_value or 0.0)
        norm, scale, skipped = float(norm), float(scale), bool(skipped)
        if skipped:
            # nothing was written: states and buffers made for this step are
            # dropped, as if the step had not happened
            self._drop_made(new, made)
            self.n_skipped += 1
        else:
            # the kernel wrote through the tensors' storage: tell autograd
            torch.autograd.graph.increment_version(params)
            if steps is not None:
                if fast:
                    _mt.add_one_f32(np.fromiter((t.data_ptr() for t in steps), np.int64,
                                                len(steps)))
                else:
                    torch._foreach_add_(steps, 1.0)
            self.n_updates += 1
        self.stats = StepStats(step=self.n_updates, lr=hp[0, _k.HP_LR], grad_norm=norm,
                               clip_scale=scale, clipped=(not skipped) and scale < 1.0,
                               skipped=skipped, layer_norms=np.sqrt(tensor_sq))
        if skipped and not self.skip_nonfinite:
            raise NonFiniteGradientError(
                f"non-finite gradient norm {norm}; parameters and optimizer state were left "
                "unchanged")
        return loss


_NOOP_DOC = """
    clip_norm : float or None
        Scale the gradients by ``min(1, clip_norm / (norm + 1e-6))``, ``norm``
        their global L2 norm over every group, as ``clip_grad_norm_`` does
        before the step (so drop that line); the norm is summed in float64
        (torch sums a float32 norm in float32: above ~1.8e19 it is inf there
        and the gradients are zeroed, here they are clipped).
    clip_value : float or None
        Then clamp each gradient entry to ``[-clip_value, clip_value]``, as
        ``clip_grad_value_``.
    skip_nonfinite : bool
        A NaN/Inf gradient norm skips the whole update (nothing written,
        ``opt.stats.skipped``, ``opt.n_skipped``); False raises
        :class:`fastgrad.NonFiniteGradientError` instead (nothing written
        either).
    foreach, fused, capturable, differentiable
        PyTorch's implementation switches that the torch twin's signature
        has (SGD has no ``capturable``), accepted at the values that
        describe what fastgrad does (None/False; False); any other value is
        refused (ValueError naming it).

    Attributes
    ----------
    stats : fastgrad.StepStats or None
        What the last ``step()`` did: ``grad_norm`` (global, before
        clipping), ``layer_norms`` (one per parameter that had a gradient,
        in ``param_groups`` order), ``clip_scale``, ``clipped``, ``skipped``,
        ``lr`` (of the first group with gradients), ``step``
        (``n_updates``).
    n_updates, n_skipped : int
        Steps applied, and skipped for a non-finite gradient, by this
        object: not in ``state_dict`` (torch's format), so a loaded
        optimizer counts them from 0 while each parameter's
        ``state["step"]`` carries on.
    parallel : bool
        Run the update on Numba's threads (default False; bitwise the same).
"""


class Adam(_FusedOptimizer):
    r"""``torch.optim.Adam`` with the fused, clipped update of fastgrad.

    The rule is torch's (and :class:`fastgrad.Adam`'s): Kingma & Ba, "Adam:
    A Method for Stochastic Optimization", ICLR 2015; AMSGrad (Reddi et
    al., ICLR 2018) with ``amsgrad=True``; ``decoupled_weight_decay=True``
    is AdamW.

    Parameters
    ----------
    params : iterable of tensors or of parameter-group dicts
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As ``torch.optim.Adam``; per group, read at every step.
    """

    _rules = ("adam", "adamw")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 clip_norm=None, clip_value=None, skip_nonfinite=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, clip_norm, clip_value, skip_nonfinite)


class AdamW(Adam):
    r"""``torch.optim.AdamW`` (decoupled weight decay; Loshchilov & Hutter,
    ICLR 2019) with the fused, clipped update of fastgrad.  Default decay
    1e-2.  Parameters as :class:`Adam`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, clip_norm=None, clip_value=None,
                 skip_nonfinite=True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, clip_norm=clip_norm,
                         clip_value=clip_value, skip_nonfinite=skip_nonfinite)


class SGD(_FusedOptimizer):
    r"""``torch.optim.SGD`` (momentum, dampening, Nesterov) with the fused,
    clipped update of fastgrad.

    Parameters
    ----------
    params : iterable of tensors or of parameter-group dicts
    lr, momentum, dampening, weight_decay, nesterov, maximize
        As ``torch.optim.SGD``; per group, read at every step.
    """

    _rules = ("sgd",)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, clip_norm=None, clip_value=None, skip_nonfinite=True):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, clip_norm, clip_value, skip_nonfinite)


class RMSprop(_FusedOptimizer):
    r"""``torch.optim.RMSprop`` (momentum, centered) with the fused, clipped
    update of fastgrad.

    Parameters
    ----------
    params : iterable of tensors or of parameter-group dicts
    lr, alpha, eps, weight_decay, momentum, centered, maximize
        As ``torch.optim.RMSprop``; per group, read at every step.
    """

    _rules = ("rmsprop",)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, clip_norm=None, clip_value=None,
                 skip_nonfinite=True):
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults, clip_norm, clip_value, skip_nonfinite)


for _cls in (Adam, SGD, RMSprop):
    _cls.__doc__ += _NOOP_DOC      # the arguments every rule shares

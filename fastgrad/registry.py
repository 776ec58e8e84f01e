"""The activation registry: every activation fastgrad knows, in one table.

An :class:`ActivationSpec` says everything about one activation: its name
and integer code, its scalar CPU functions ``f(z, alpha)`` and
``df(a, z, alpha)`` (Numba-compilable), what the derivative reads (``"a"``,
the layer output, or ``"z"``, the pre-activation, which layers then keep),
its default ``alpha``, its PyTorch and JAX twins, its float64 reference and
its CUDA form.  Everything else reads it: the Numba ladders
(``kernels/cpu/activations.py``), the CUDA instantiation lists
(``kernels/cuda/_module.py``), the CLI's choices, ``fastgrad.interop``'s
mappings both ways, ``fastgrad.ops.resolve_activation`` and the tests'
parametrisation.

Built-ins come from ``kernels/spec.py`` (name, code, needs, default alpha,
torch and JAX twins: the device-neutral part, which the CUDA side reads
too), their scalar functions from ``kernels/cpu/activations.py``
(``<name>`` and ``d_<name>``) and their references from
``fastgrad/reference.py``.  CONTRIBUTING.md has the recipe for a new one.

:func:`register_activation` adds one at run time.  Its scalar functions are
compiled into a private copy of the CPU kernel modules (the same sources,
loaded again under another package name with the registered activations
appended to their ladders, without the disk cache: Numba cannot tell when a
user's function changed), which models using a registered activation run
on.  Models using built-ins only never see that copy: their kernels, and
their on-disk cache, are the ones they had.  On CUDA, an activation
registered with ``cuda=`` expressions becomes one more ``fg::Act<code>``
specialisation of the device kernels (``kernels/cuda/_module.py``).
"""
import importlib
import os
import sys
import threading
import types
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import reference as _reference
from .kernels import spec as _spec

__all__ = ["ActivationSpec", "TorchTwin", "JaxTwin", "register_activation", "get", "names",
           "specs", "by_code", "is_builtin", "cpu_kernels"]

TorchTwin = namedtuple("TorchTwin", "module kwargs alpha")
TorchTwin.__doc__ = """PyTorch's module for an activation: ``torch.nn.<module>(**kwargs)``
(``kwargs`` must also match on a module read by ``from_torch``), the
activation's alpha passed as, and read from, the attribute ``alpha`` (None:
no parameter)."""
JaxTwin = namedtuple("JaxTwin", "function kwargs")
JaxTwin.__doc__ = """JAX's function for an activation: ``jax.nn.<function>(z, **kwargs)``."""


@dataclass(frozen=True)
class ActivationSpec:
    """One activation; see the module docstring.

    Attributes
    ----------
    name : str
    code : int
        The kernels' code (``kernels/spec.py`` row for built-ins,
        ``spec.FIRST_CUSTOM_CODE`` and up for registered ones).
    f, df : callable
        Scalar ``f(z, alpha)`` and ``df(a, z, alpha)``, Numba-compilable.
    needs : {"a", "z"}
        What ``df`` reads besides ``alpha``.
    alpha : float or None
        Default alpha (None: no parameter; alpha is then 0.0 in kernels).
    torch : TorchTwin or None
    jax : JaxTwin or None
    reference : (callable, callable) or None
        float64 NumPy ``f(z, alpha)`` and ``f'(z, alpha)`` (from z).
    cuda : str or (str, str) or None
        Built-ins: the C++ enum name (generated from ``kernels/spec.py`` by
        ``kernels/cuda/_module.py``, with their CUDA forms).  Registered: the
        forward and derivative as CUDA C expressions, or None (CPU only).
    builtin : bool
    """
    name: str
    code: int
    f: Callable
    df: Callable
    needs: str
    alpha: Optional[float] = None
    torch: Optional[TorchTwin] = None
    jax: Optional[JaxTwin] = None
    reference: Optional[Any] = None
    cuda: Optional[Any] = None
    builtin: bool = True

    @property
    def needs_z(self):
        return self.needs == "z"


_lock = threading.RLock()
_specs = {}            # name -> ActivationSpec, built-ins first, in code order


def _builtins():
    from .kernels.cpu import activations as cpu_act
    for code, row in enumerate(_spec.ACTIVATIONS):
        torch = None if row.torch is None else TorchTwin(*row.torch)
        jax = None if row.jax is None else JaxTwin(*row.jax)
        _specs[row.name] = ActivationSpec(
            name=row.name, code=code, f=getattr(cpu_act, row.name),
            df=getattr(cpu_act, "d_" + row.name), needs=row.needs, alpha=row.alpha,
            torch=torch, jax=jax, reference=_reference.ACTIVATIONS[row.name],
            cuda=row.name.upper())


_builtins()


def get(name):
    """The :class:`ActivationSpec` named ``name``, or None."""
    return _specs.get(name)


def names():
    """Every activation's name: built-ins in code order, then registered ones."""
    return list(_specs)


def specs():
    """Every :class:`ActivationSpec`, as :func:`names` orders them."""
    return list(_specs.values())


def by_code(code):
    """The spec of activation code ``code``, or None."""
    for s in _specs.values():
        if s.code == code:
            return s
    return None


def is_builtin(name):
    s = _specs.get(name)
    return s is not None and s.builtin


def _check_scalar_fn(fn, what):
    from numba.core.registry import CPUDispatcher
    if isinstance(fn, CPUDispatcher):
        return fn
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"register_activation: {what} must be a Python function or a Numba "
                        f"@njit function, got {type(fn).__name__}")
    return fn


def _twin(value, cls, what):
    """``value`` as a ``cls`` namedtuple (a plain tuple of its fields is
    taken, as kernels/spec.py's rows), checked: a name, a dict of keywords,
    (for torch) the alpha attribute or None."""
    if value is None:
        return None
    if not isinstance(value, tuple) or len(value) != len(cls._fields):
        raise TypeError(f"register_activation: {what} must be a fastgrad.registry.{cls.__name__}"
                        f"{cls._fields}, got {value!r}")
    twin = cls(*value)
    name, kwargs = twin[0], twin[1]
    alpha = getattr(twin, "alpha", None)
    if not (isinstance(name, str) and name.isidentifier() and isinstance(kwargs, dict)
            and all(isinstance(k, str) for k in kwargs)
            and (alpha is None or isinstance(alpha, str))):
        raise TypeError(f"register_activation: {what} must name a module/function (str), its "
                        f"keywords (a dict) and its alpha attribute (str or None), got {value!r}")
    return twin


def _probe(name, f, df, alpha):
    """Compile ``f(z, alpha)`` and ``df(a, z, alpha)`` for float32 and
    float64 scalars, once, at registration: a function that does not
    compile or return a number is refused here, naming the activation,
    instead of failing every model's kernels later (they share one copy)."""
    import numpy as np
    from numba import njit
    fj = njit(error_model="numpy")(getattr(f, "py_func", f))
    dfj = njit(error_model="numpy")(getattr(df, "py_func", df))
    al = 0.0 if alpha is None else alpha
    for dt in (np.float64, np.float32):
        for what, call in (("f(z, alpha)", lambda: fj(dt(0.5), al)),
                           ("df(a, z, alpha)", lambda: dfj(dt(0.5), dt(0.5), al))):
            try:
                out = call()
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise TypeError(f"register_activation({name!r}): {what} does not compile "
                                f"for {np.dtype(dt).name} scalars ({type(exc).__name__}: "
                                f"{first[:200]})") from None
            if isinstance(out, (bool, np.bool_)) or not isinstance(out, (int, float,
                                                                          np.number)):
                raise TypeError(f"register_activation({name!r}): {what} must return a number, "
                                f"got {type(out).__name__}")


def _inline(fn):
    """``fn`` as an inlined Numba function (the ladders' loops inline it)."""
    from numba import njit
    py = getattr(fn, "py_func", fn)
    return njit(inline="always", error_model="numpy")(py)


def register_activation(name, f, df, *, needs="a", alpha=None, torch=None, jax=None,
                        cuda=None, reference=None, replace=False):
    """Add an activation that every model, layer and op can then use by name.

    After ``fg.register_activation("swish", f, df, needs="z")``,
    ``fg.MLP(..., activation="swish")`` trains through the compiled
    :class:`fastgrad.TrainStep` like a built-in: ``f`` and ``df`` are
    inlined into the same fused loops (a private, uncached copy of the CPU
    kernels; see the module docstring), in a plain model and one with epilogue
    pieces (norm, dropout, residual, weight norm) alike.

    Parameters
    ----------
    name : str
        A new name; a built-in's name raises.
    f : callable
        ``f(z, alpha) -> a``: a scalar function Numba can compile (a plain
        Python function or an ``@njit`` one), called with ``z`` of the
        model's dtype and ``alpha`` a float64.  To stay in float32, write
        constants through ``fastgrad.kernels.cpu.mathfn.like(z, c)``.
    df : callable
        ``df(a, z, alpha) -> f'(z)`` given the output ``a = f(z)`` and ``z``.
    needs : {"a", "z"}
        What ``df`` reads: ``"a"`` (then ``z`` is not kept and ``df`` gets
        ``a`` in its place) or ``"z"`` (layers keep ``z``).
    alpha : float, optional
        Default alpha (None: the activation takes none).
    torch : TorchTwin, optional
        Its PyTorch module, for ``fastgrad.interop`` both ways.
    jax : JaxTwin, optional
    cuda : (str, str), optional
        The forward and derivative as CUDA C expressions of ``z``, ``a`` and
        ``alpha`` (all of the kernel's float type ``T``; ``exp_``,
        ``expm1_``, ``log1p_``, ``tanh_``, ``erfc_``, ``abs_`` are CUDA's
        libm for ``T``), e.g. ``("z / (T(1) + exp_(-z))", ...)``.  Without
        them a CUDA model using the activation raises when it is built.
    reference : (callable, callable), optional
        float64 NumPy ``f(z, alpha)`` and ``f'(z, alpha)``: what
        ``fastgrad.reference`` (and so gradient checks) use for it.
    replace : bool
        Replace an activation registered before under ``name``; without it,
        registering a name twice raises.

    Returns
    -------
    ActivationSpec
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_activation: name must be an identifier string, got {name!r}")
    if needs not in ("a", "z"):
        raise ValueError(f"register_activation: needs must be 'a' or 'z', got {needs!r}")
    if alpha is not None:
        alpha = float(alpha)
    f = _check_scalar_fn(f, "f")
    df = _check_scalar_fn(df, "df")
    torch = _twin(torch, TorchTwin, "torch")
    jax = _twin(jax, JaxTwin, "jax")
    if cuda is not None and not (isinstance(cuda, (tuple, list)) and len(cuda) == 2
                                 and all(isinstance(e, str) for e in cuda)):
        raise TypeError("register_activation: cuda must be two CUDA C expression strings "
                        f"(forward, derivative), got {cuda!r}")
    if reference is not None and not (isinstance(reference, (tuple, list)) and len(reference) == 2
                                      and all(callable(r) for r in reference)):
        raise TypeError("register_activation: reference must be two callables "
                        f"(f(z, alpha), df(z, alpha)), got {reference!r}")
    _probe(name, f, df, alpha)
    with _lock:
        old = _specs.get(name)
        if old is not None and old.builtin:
            raise ValueError(f"register_activation: {name!r} is a built-in activation; "
                             "choose another name")
        if old is not None and not replace:
            raise ValueError(f"register_activation: {name!r} is already registered; pass "
                             "replace=True to replace it")
        if old is not None:
            # A model's compiled layer path and steps keep the function they
            # were built with: replaced under them, one path would run the
            # old function and another the new on the same weights.
            from .layers import models_using
            using = models_using(old.code)
            if using:
                raise ValueError(f"register_activation: {name!r} is used by {using} live "
                                 "model(s); replace it before building them (or delete them)")
        code = old.code if old is not None else max(
            [_spec.FIRST_CUSTOM_CODE - 1] + [s.code for s in _specs.values()]) + 1
        spec = ActivationSpec(name=name, code=code, f=f, df=df, needs=needs, alpha=alpha,
                              torch=torch, jax=jax,
                              reference=None if reference is None else tuple(reference),
                              cuda=None if cuda is None else tuple(cuda), builtin=False)
        _specs[name] = spec
        _variant.clear()       # the copy of the kernels is rebuilt with it on next use
    return spec


def _forget(name):
    """Drop a registered activation (tests)."""
    with _lock:
        s = _specs.get(name)
        if s is not None and not s.builtin:
            del _specs[name]
            _variant.clear()


# --- the kernels of registered activations -------------------------------------------

_variant = {}          # (rules, losses, features) -> package module, for the current registrations
_generation = [0]


def cuda_table():
    """{code: (needs_z, forward, derivative)} of the registered activations
    that have CUDA forms (``kernels/cuda/_module.py`` compiles them)."""
    return {s.code: (s.needs_z, s.cuda[0], s.cuda[1]) for s in _specs.values()
            if not s.builtin and s.cuda is not None}


def uses_registered(codes):
    """True when any of ``codes`` is a registered (not built-in) activation."""
    return any(int(c) >= _spec.FIRST_CUSTOM_CODE for c in codes)


_SUBMODULES = ("step", "step_blocks", "step_sharded", "blocks", "norm", "wnorm", "dense",
               "optim")
# Modules that depend on none of the codes a copy is built for: a copy uses
# the package's own, so their kernels (the losses, norms) compile once per
# process and disk cache, whatever the number of copies.
_SHARED = ("mathfn", "losses", "reduce", "wnorm", "gemm")
_subsets = {}          # (activations, rules, losses, features) -> package module


def _code_set(codes, every, what):
    if codes is None:
        return frozenset(every)
    out = frozenset(int(c) for c in codes)
    unknown = sorted(out - set(every))
    if unknown:
        raise ValueError(f"unknown {what} code(s) {unknown}; known: {sorted(every)}")
    return out


def cpu_kernels(codes=None, rules=None, losses=None, features=None, team=False):
    """The CPU kernel package for a model's activation ``codes``, update
    ``rules`` and ``losses`` (codes of ``kernels/spec.py``; None: every
    one) and layer ``features`` (names of ``kernels/cpu/step.py``
    ``FEATURES``: "dropout", "norm", "residual", "weight_norm"; None: every
    one): a module with the attributes of ``fastgrad.kernels.cpu`` and its
    submodules ``step``, ``step_blocks``, ``step_sharded``, ``blocks``,
    ``norm``, ``wnorm``, ``dense``, ``optim``, ``activations``.  Its kernels
    serve those codes alone: any other raises ValueError in them.  Its step
    driver is compiled for those features alone (a plain model's, for
    ``features=()``, compiles no epilogue code) and runs a layer with another
    feature as a plain one: ``TrainStep`` checks that its model's features
    are served before it calls the driver.

    With a registered activation among ``codes`` (or ``codes=None`` while
    some are registered): one copy serving the built-ins and every
    registered activation, built once per set of registrations (and of rules
    and losses), compiled on first use, not cached on disk (Numba could not
    tell when a user's function changed).  Built-in codes only: a copy that
    compiles the loops of those activations, rules and losses alone, cached
    on disk like the package itself -- a model's first step then compiles
    2 activation loops, one rule and one loss instead of all of them.

    ``team``: whether its step driver has the branches that run its
    activation, loss and update passes through the pass team's members, split on
    the team or not (``kernels/cpu/pass_team.py``; a ``TrainStep`` asks for
    them while there is a team).  Without them the driver runs its own
    serial passes and a cold first step compiles no member (~0.7 s less).
    """
    rules = _code_set(rules, _spec.RULES.values(), "update rule")
    losses = _code_set(losses, _spec.LOSS_CODES.values(), "loss")
    features = _feature_set(features)
    if codes is not None and not uses_registered(codes):
        return _subset_kernels(frozenset(int(c) for c in codes), rules, losses, features,
                               bool(team))
    with _lock:
        pkg = _variant.get((rules, losses, features, bool(team)))
        if pkg is None:
            _generation[0] += 1
            pkg = _variant[rules, losses, features, bool(team)] = _load_copy(
                f"fastgrad.kernels._registered{_generation[0]}",
                "fastgrad.kernels.cpu with registered activations",
                _EXTRA_ACTIVATIONS=tuple(
                    (s.code, _inline(s.f), _inline(s.df), s.needs_z)
                    for s in _specs.values() if not s.builtin),
                _NO_DISK_CACHE=True, _TEAM=bool(team),
                **_only("RULES", rules, _spec.RULES.values()),
                **_only("LOSSES", losses, _spec.LOSS_CODES.values()),
                **_only("FEATURES", features, _step_features()))
        return pkg


def _step_features():
    from .kernels.cpu.step import FEATURES
    return FEATURES


def _feature_set(features):
    every = _step_features()
    if features is None:
        return frozenset(every)
    if isinstance(features, str):
        raise TypeError(f"features must be a collection of names, got {features!r}")
    out = frozenset(features)
    unknown = sorted(out - set(every))
    if unknown:
        raise ValueError(f"unknown layer feature(s) {unknown}; known: {list(every)}")
    return out


def rebuild_args(package):
    """The :func:`cpu_kernels` keywords that build the copy named
    ``package`` again, in another process too (``fastgrad._compile_worker``);
    ``{}`` for ``fastgrad.kernels.cpu`` itself (:func:`full_cpu_kernels`);
    None for a copy with registered activations (not cached on disk)."""
    if package == "fastgrad.kernels.cpu":
        return {}
    return getattr(sys.modules.get(package), "_REBUILD", None)


def full_cpu_kernels():
    """``fastgrad.kernels.cpu`` itself, serving every built-in code, with the
    submodules of :func:`cpu_kernels`'s copies imported."""
    import fastgrad.kernels.cpu as base
    for sub in _SUBMODULES:
        importlib.import_module(f"{base.__name__}.{sub}")
    return base


def _only(kind, codes, every):
    """The package attribute restricting a copy to ``codes`` of ``kind``
    (none when it serves every one: the package's own code)."""
    return {} if codes == frozenset(every) else {f"_ONLY_{kind}": codes}


def _subset_kernels(codes, rules, losses, features, team):
    with _lock:
        pkg = _subsets.get((codes, rules, losses, features, team))
        if pkg is None:
            tag = "_".join(str(c) for c in sorted(codes))
            attrs = dict(_only("RULES", rules, _spec.RULES.values()),
                         **_only("LOSSES", losses, _spec.LOSS_CODES.values()),
                         **_only("FEATURES", features, _step_features()))
            # A copy for every rule, loss and feature keeps its earlier name
            # (and cache files).
            for kind, letter in (("RULES", "r"), ("LOSSES", "l")):
                if f"_ONLY_{kind}" in attrs:
                    tag += f"_{letter}" + "_".join(str(c) for c in sorted(attrs[f"_ONLY_{kind}"]))
            if "_ONLY_FEATURES" in attrs:
                tag += "_f" + ("_".join(sorted(features)) or "plain")
            if team:
                tag += "_team"
            pkg = _subsets[codes, rules, losses, features, team] = _load_copy(
                f"fastgrad.kernels._cpu_{tag}",
                f"fastgrad.kernels.cpu compiled for activation codes {sorted(codes)}, rules "
                f"{sorted(rules)}, losses {sorted(losses)}, layer features "
                f"{sorted(features)}{', pass team' if team else ''}",
                _ONLY_ACTIVATIONS=codes, _VARIANT=f"activations:{tag}", _TEAM=team,
                _REBUILD=dict(codes=sorted(codes), rules=sorted(rules), losses=sorted(losses),
                              features=sorted(features), team=team),
                **attrs)
        return pkg


def _load_copy(pkgname, doc, **attrs):
    """``fastgrad.kernels.cpu`` loaded again from its files as ``pkgname``,
    with ``attrs`` set on the package before its modules run."""
    import fastgrad.kernels.cpu as base
    pkg = types.ModuleType(pkgname, doc)
    pkg.__path__ = list(base.__path__)
    pkg.__package__ = pkgname
    for key, value in attrs.items():
        setattr(pkg, key, value)
    for name in _SHARED:
        module = importlib.import_module(f"{base.__name__}.{name}")
        sys.modules[f"{pkgname}.{name}"] = module
        setattr(pkg, name, module)
    sys.modules[pkgname] = pkg
    try:
        init = os.path.join(base.__path__[0], "__init__.py")
        with open(init, encoding="utf-8") as fh:
            exec(compile(fh.read(), init, "exec"), pkg.__dict__)
        for sub in _SUBMODULES:
            setattr(pkg, sub, importlib.import_module(f"{pkgname}.{sub}"))
    except BaseException:
        for name in [pkgname] + [f"{pkgname}.{n}" for n in _SHARED]:
            sys.modules.pop(name, None)
        raise
    return pkg

"""Device-neutral constants of the kernels: the one place both twins read.

``kernels/cpu`` and ``kernels/cuda`` import their shared codes from here and
never from each other.  The CUDA sources mirror some of these as C++ enums
(``cuda/common.cuh``, ``cuda/norm.cu``): ``tests/test_registry.py`` parses
those enums and fails on any difference, and the CUDA template
instantiation lists (``cuda/_module.py``) are built from the tables below.

Activations
-----------
``ACTIVATIONS`` lists the built-in activations in code order: a code is the
index of its row, so a new built-in is appended (codes are written into no
file -- checkpoints store names -- but appending keeps every other code
still).  Each row says what its derivative reads: ``"a"`` (the layer's
output, kept anyway) or ``"z"`` (the pre-activation, which its layers then
keep as well), and its default ``alpha`` (None: the activation has no
parameter), its PyTorch and JAX twins (names: plain data) and its CUDA
forms (C++ source text, from which ``cuda/_module.py`` generates the C++
enum, the ``fg::Act<NAME>`` specialisations and nvcc's instantiation list).
Its scalar CPU functions are ``<name>``/``d_<name>`` in
``cpu/activations.py``, its float64 reference in ``fastgrad/reference.py``;
``fastgrad.registry`` puts the three together (CONTRIBUTING.md has the
recipe).

Activations registered at run time (``fastgrad.register_activation``) take
codes from ``FIRST_CUSTOM_CODE`` up, so built-in codes can grow without
meeting them.

Update rules
------------
``UPDATE_RULES`` lists the optimizer update rules in code order, each with
its state buffers, hyper-parameters and their ``hp`` slots, and its
``torch.optim`` twin (the comment above the table says how); ``rule_state``,
``fill_hp`` and ``check_rule_values`` read a row.  The optimizer classes of
``fastgrad.optim`` and ``fastgrad.torch`` are built from it; the kernels are
``cpu/optim.py`` and ``cuda/optim.cuh`` (CONTRIBUTING.md has the recipe).
"""
from collections import namedtuple

Activation = namedtuple("Activation", "name needs alpha torch jax cuda")

# name, what f' reads, default alpha, PyTorch twin (torch.nn class, the
# settings it must have, the attribute holding alpha), JAX twin (jax.nn
# function, its keyword arguments), CUDA forms (f, f'): C++ of ``T z``,
# ``T a``, ``T alpha`` (T float or double), each an expression or a body
# with ``return`` -- the CPU's formula operation by operation, with
# common.cuh's exp_/expm1_/log1p_/tanh_/erfc_/abs_ and activation.cuh's
# constants (kernels/cuda/_module.py makes each row an fg::Act<NAME>).
ACTIVATIONS = (
    Activation("identity", "a", None, ("Identity", {}, None), None,
               ("z", "T(1)")),
    Activation("relu", "a", None, ("ReLU", {}, None), ("relu", {}),
               ("z < T(0) ? T(0) : z", "a <= T(0) ? T(0) : T(1)")),
    Activation("leaky_relu", "a", 0.01, ("LeakyReLU", {}, "negative_slope"), ("leaky_relu", {}),
               ("z < T(0) ? alpha * z : z", "a > T(0) ? T(1) : alpha")),
    Activation("elu", "a", 1.0, ("ELU", {}, "alpha"), ("elu", {}),
               ("z <= T(0) ? alpha * expm1_(z) : z", "a <= T(0) ? a + alpha : T(1)")),
    Activation("sigmoid", "a", None, ("Sigmoid", {}, None), ("sigmoid", {}),
               ("T(1) / (T(1) + exp_(-z))", "a * (T(1) - a)")),
    Activation("tanh", "a", None, ("Tanh", {}, None), ("tanh", {}),
               ("tanh_(z)", "T(1) - a * a")),
    Activation("softplus", "a", None, ("Softplus", {"beta": 1.0, "threshold": 20.0}, None),
               ("softplus", {}),
               # torch's threshold 20: z itself above it (a differs by < 2.1e-9)
               ("z > T(20) ? z : (z > T(0) ? z : T(0)) + log1p_(exp_(-abs_(z)))",
                "a > T(20) ? T(1) : -expm1_(-a)")),
    # exact: z Phi(z), with erf -- PyTorch's nn.GELU() and Keras's default
    Activation("gelu", "z", None, ("GELU", {"approximate": "none"}, None),
               ("gelu", {"approximate": False}),
               ("T(0.5) * z * erfc_(-z * T(SQRT1_2))",
                "const T half = T(0.5);\n"
                "return half * erfc_(-z * T(SQRT1_2))"
                " + z * (T(INV_SQRT_2PI) * exp_(-(half * z * z)));")),
    Activation("silu", "z", None, ("SiLU", {}, None), ("silu", {}),
               ("const T e = exp_(-abs_(z));\n"
                "return z * ((z >= T(0) ? T(1) : e) / (T(1) + e));",
                "const T one = T(1);\n"
                "const T e = exp_(-abs_(z));\n"
                "const bool pos = z >= T(0);\n"
                "const T d = one + e;\n"
                "const T s = (pos ? one : e) / d;\n"
                "return s * (one + z * ((pos ? e : one) / d));")),
    # the tanh approximation (fastgrad's "gelu" in checkpoint format 1)
    Activation("gelu_tanh", "z", None, ("GELU", {"approximate": "tanh"}, None),
               ("gelu", {"approximate": True}),
               ("const T inner = T(GELU_K) * (z + T(GELU_C) * z * z * z);\n"
                "return T(0.5) * z * (T(1) + tanh_(inner));",
                "const T one = T(1), half = T(0.5), k = T(GELU_K), c = T(GELU_C);\n"
                "const T t = tanh_(k * (z + c * z * z * z));\n"
                "return half * (one + t) + ((half * (one - t * t)) * z)"
                " * (k * (one + T(3.0) * c * z * z));")),
)
FIRST_CUSTOM_CODE = 64

CODES = {a.name: code for code, a in enumerate(ACTIVATIONS)}
DEFAULT_ALPHA = {a.name: a.alpha for a in ACTIVATIONS if a.alpha is not None}
NEEDS_Z = frozenset(code for code, a in enumerate(ACTIVATIONS) if a.needs == "z")
# Whose forward pass is memory-bound (no transcendental per output): the
# step's thread team takes it on large layers only (cpu/pass_team.py).
MEMORY_BOUND = frozenset(CODES[n] for n in ("identity", "relu", "leaky_relu"))
# Whose derivative pass is memory-bound (read from a, no transcendental).
MEMORY_BOUND_GRADIENT = MEMORY_BOUND | frozenset(CODES[n] for n in ("elu", "sigmoid", "tanh"))
N_ACTIVATIONS = len(ACTIVATIONS)

(IDENTITY, RELU, LEAKY_RELU, ELU, SIGMOID, TANH, SOFTPLUS, GELU, SILU,
 GELU_TANH) = (CODES[a.name] for a in ACTIVATIONS)

# Losses of the whole-step kernels.
CROSS_ENTROPY, MSE, BCE_WITH_LOGITS = range(3)
LOSS_CODES = {"softmax_cross_entropy": CROSS_ENTROPY, "mse": MSE,
              "bce_with_logits": BCE_WITH_LOGITS}

# Normalisation inside a dense layer (kernels/*/norm).
NO_NORM, LAYER, BATCH = 0, 1, 2
NORM_KINDS = {None: NO_NORM, "layer": LAYER, "batch": BATCH}
NORM_EPS = 1e-5
NORM_MOMENTUM = 0.1

# The slots of the per-update hyper-parameter row ``hp`` of the optimizer
# kernels (kernels/*/optim; float64, HP_SIZE long; each rule reads its own,
# as UPDATE_RULES below says).
HP_LR = 0            # learning rate of this update (the schedule's value)
HP_WEIGHT_DECAY = 1  # L2 (SGD, Adam, RMSprop) or decoupled (AdamW) decay
HP_BETA1 = 2         # Adam
HP_BETA2 = 3         # Adam
HP_EPS = 4           # Adam, RMSprop
HP_BIAS_CORR1 = 5    # Adam: 1 - beta1 ** t, t = update number + 1
HP_BIAS_CORR2 = 6    # Adam: 1 - beta2 ** t
HP_AMSGRAD = 7       # Adam: 1.0 keeps max_exp_avg_sq in s2
HP_MOMENTUM = 8      # SGD, RMSprop
HP_DAMPENING = 9     # SGD
HP_NESTEROV = 10     # SGD: 1.0 for Nesterov momentum
HP_FIRST = 11        # SGD: 1.0 when the momentum buffer is not yet set (t = 1)
HP_ALPHA = 12        # RMSprop smoothing constant
HP_CENTERED = 13     # RMSprop: 1.0 keeps grad_avg in s2
HP_UPDATE = 14       # the update index k the row was filled for (CUDA picks its row by it)
HP_MAXIMIZE = 15     # 1.0: ascend (torch's maximize=True), the clipped gradient is negated
HP_END = 16          # one row per segment (parameter groups): the segment's end in p
HP_SIZE = 17

# Optimizer update rules
# ----------------------
# ``UPDATE_RULES`` lists them in code order (a code is the row index:
# append, never insert; checkpoints store names).  A row says everything
# fastgrad's Python side needs about a rule -- the optimizer classes of
# ``fastgrad.optim`` and ``fastgrad.torch``, checkpoints and the CLI read it
# -- while its per-element update is ``_<name>_range`` in ``cpu/optim.py``
# and a device function in ``cuda/optim.cuh`` (CONTRIBUTING.md has the
# recipe).
#
# ``state``: the rule's buffers in the kernels' slot order ``s0, s1, s2``,
# named as torch's state keys; ``when`` is the hyper-parameter whose truth
# (nonzero, True) makes the rule keep the buffer, None: always kept.
# ``hyper``: its own hyper-parameters (beyond ``lr`` and ``maximize``, which
# every rule has): name, default (torch's), validator (``"nonneg"``: a
# finite float >= 0, ``"fraction"``: in [0, 1], ``"flag"``: a bool,
# ``"betas"``: a pair in [0, 1); ``fastgrad.optim._CHECKS``) and the hp
# slots its value fills (a pair fills one slot per item).  ``per_update``:
# the hp slots computed for update ``t = 1, 2, ...`` as ``term(values, t)``
# (a rule whose torch twin keeps no step count may only ask whether
# ``t == 1``: torch knows no more).  ``requires``: ``(test(values),
# message)`` pairs over several hyper-parameters (ValueError when a test
# fails).  ``torch``: the ``torch.optim`` class it mirrors, the fixed keys
# torch writes in its param_groups beyond the hyper-parameters, and whether
# torch keeps ``state["step"]`` for it (a rule without one: None; it then
# has no ``fastgrad.torch`` class nor torch-format state dicts).
RuleState = namedtuple("RuleState", "name when")
RuleHyper = namedtuple("RuleHyper", "name default check slots")
TorchOptim = namedtuple("TorchOptim", "cls group_keys counts_steps")
UpdateRule = namedtuple("UpdateRule", "name lr state hyper per_update requires torch")

N_STATE_SLOTS = 3      # s0, s1, s2: every update kernel's signature

_TORCH_FLAGS = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}


def _first(values, t):
    return float(t == 1)


def _bias_corr1(values, t):
    return 1.0 - values["betas"][0] ** t


def _bias_corr2(values, t):
    return 1.0 - values["betas"][1] ** t


def _adam_like(name, weight_decay, decoupled, torch_cls):
    return UpdateRule(
        name, 1e-3,
        (RuleState("exp_avg", None), RuleState("exp_avg_sq", None),
         RuleState("max_exp_avg_sq", "amsgrad")),
        (RuleHyper("betas", (0.9, 0.999), "betas", (HP_BETA1, HP_BETA2)),
         RuleHyper("eps", 1e-8, "nonneg", (HP_EPS,)),
         RuleHyper("weight_decay", weight_decay, "nonneg", (HP_WEIGHT_DECAY,)),
         RuleHyper("amsgrad", False, "flag", (HP_AMSGRAD,))),
        ((HP_BIAS_CORR1, _bias_corr1), (HP_BIAS_CORR2, _bias_corr2)), (),
        TorchOptim(torch_cls, dict(_TORCH_FLAGS, decoupled_weight_decay=decoupled), True))


UPDATE_RULES = (
    UpdateRule(
        "sgd", 1e-3,
        (RuleState("momentum_buffer", "momentum"),),
        (RuleHyper("momentum", 0.0, "nonneg", (HP_MOMENTUM,)),
         RuleHyper("dampening", 0.0, "fraction", (HP_DAMPENING,)),
         RuleHyper("nesterov", False, "flag", (HP_NESTEROV,)),
         RuleHyper("weight_decay", 0.0, "nonneg", (HP_WEIGHT_DECAY,))),
        # torch's first update sets the momentum buffer to the gradient, undampened
        ((HP_FIRST, _first),),
        ((lambda v: not v["nesterov"] or (v["momentum"] > 0 and v["dampening"] == 0),
          "Nesterov momentum requires a momentum and zero dampening"),),
        TorchOptim("SGD", {"foreach": None, "differentiable": False, "fused": None}, False)),
    _adam_like("adam", 0.0, False, "Adam"),
    _adam_like("adamw", 1e-2, True, "AdamW"),
    UpdateRule(
        "rmsprop", 1e-2,
        (RuleState("square_avg", None), RuleState("momentum_buffer", "momentum"),
         RuleState("grad_avg", "centered")),
        (RuleHyper("alpha", 0.99, "fraction", (HP_ALPHA,)),
         RuleHyper("eps", 1e-8, "nonneg", (HP_EPS,)),
         RuleHyper("weight_decay", 0.0, "nonneg", (HP_WEIGHT_DECAY,)),
         RuleHyper("momentum", 0.0, "nonneg", (HP_MOMENTUM,)),
         RuleHyper("centered", False, "flag", (HP_CENTERED,))),
        (), (),
        TorchOptim("RMSprop", {"capturable": False, "foreach": None, "differentiable": False},
                   True)),
)

RULES = {r.name: code for code, r in enumerate(UPDATE_RULES)}
N_RULES = len(UPDATE_RULES)
SGD, ADAM, ADAMW, RMSPROP = (RULES[r.name] for r in UPDATE_RULES)


def rule_state(rule, values):
    """The names of the state buffers update rule ``rule`` (a code) keeps
    under the hyper-parameters ``values`` (name -> value), in slot order."""
    return tuple(s.name for s in UPDATE_RULES[rule].state
                 if s.when is None or values[s.when])


def _hp_filler(row, per_update_only=False):
    # Straight-line code per rule, generated once: a CUDA optimizer fills up
    # to 17 rows per step on the host, so this is in the step's critical path
    # (a loop over the row's fields costs twice the hand-written assignments).
    body, env = [], {}
    for h in () if per_update_only else row.hyper:
        if len(h.slots) == 1:
            body.append(f"hp[{h.slots[0]}] = float(values[{h.name!r}])")
        else:
            body.append(", ".join(f"hp[{slot}]" for slot in h.slots) + f" = values[{h.name!r}]")
    for i, (slot, term) in enumerate(row.per_update):
        env[f"term{i}"] = term
        body.append(f"hp[{slot}] = term{i}(values, t)")
    src = "def fill(hp, values, t):\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    exec(compile(src, f"<fill_hp {row.name}>", "exec"), env)
    return env["fill"]


_HP_FILLERS = tuple(_hp_filler(r) for r in UPDATE_RULES)
_HP_PER_UPDATE_FILLERS = tuple(_hp_filler(r, per_update_only=True) for r in UPDATE_RULES)


def fill_hp(rule, hp, values, t):
    """Write rule ``rule``'s own slots of the float64 ``hp`` row for update
    ``t = 1, 2, ...`` under the hyper-parameters ``values`` (name -> value;
    the other slots -- lr, maximize, update index, segment end -- are the
    caller's)."""
    _HP_FILLERS[rule](hp, values, t)


def per_update_filler(rule):
    """Rule ``rule``'s function of ``(hp, values, t)`` that rewrites only the
    slots of ``hp`` that :func:`fill_hp` derives from the update count ``t``
    (e.g. Adam's bias corrections): the rest of a row filled for another
    count under the same ``values`` stays right.  ``hp`` may be a
    memoryview of the row."""
    return _HP_PER_UPDATE_FILLERS[rule]


def check_rule_values(rule, values):
    """ValueError when the hyper-parameters ``values`` break one of rule
    ``rule``'s ``requires``."""
    for test, message in UPDATE_RULES[rule].requires:
        if not test(values):
            raise ValueError(message)


def hp_slots():
    """``{"HP_LR": 0, ...}``: every hp slot by name (for the enum check)."""
    return {k: v for k, v in globals().items() if k.startswith("HP_")}


# Dropout's counter-based mask (kernels/cpu/blocks.py explains it): the key
# and threshold are host scalars both twins pass to their kernels by value.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1


def _fin(z):
    # splitmix64's finalizer on Python ints (exact 64-bit wrap-around)
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def dropout_layer_key(seed, layer):
    """The key of ``layer``'s masks before the dropout step is mixed in: the
    fused CUDA step passes it and its kernels derive each step's key from a
    counter in device memory (blocks.cuh ``step_key``)."""
    k = _fin((int(seed) + _GOLDEN) & _M64)
    return _fin(((k ^ int(layer)) + _GOLDEN) & _M64)


def dropout_key(seed, layer, counter):
    """The 64-bit key (an int) of ``layer``'s mask at dropout step ``counter``
    of a model seeded ``seed``; pass it on as ``np.uint64``."""
    return _fin(((dropout_layer_key(seed, layer) ^ int(counter)) + _GOLDEN) & _M64)


def dropout_threshold(p):
    """uint64 threshold on the 53 drawn bits: keep iff bits >= it (0: keep all)."""
    import math

    import numpy as np
    return np.uint64(math.ceil(float(p) * 2.0 ** 53))

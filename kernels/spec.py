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
               ("z < T(0) ? T(0) : z", "a > T(0) ? T(1) : T(0)")),
    Activation("leaky_relu", "a", 0.01, ("LeakyReLU", {}, "negative_slope"), ("leaky_relu", {}),
               ("z < T(0) ? alpha * z : z", "a > T(0) ? T(1) : alpha")),
    Activation("elu", "a", 1.0, ("ELU", {}, "alpha"), ("elu", {}),
               ("z <= T(0) ? alpha * expm1_(z) : z", "a > T(0) ? T(1) : a + alpha")),
    Activation("sigmoid", "a", None, ("Sigmoid", {}, None), ("sigmoid", {}),
               ("T(1) / (T(1) + exp_(-z))", "a * (T(1) - a)")),
    Activation("tanh", "a", None, ("Tanh", {}, None), ("tanh", {}),
               ("tanh_(z)", "T(1) - a * a")),
    Activation("softplus", "a", None, ("Softplus", {"beta": 1.0, "threshold": 20.0}, None),
               ("softplus", {}),
               ("(z > T(0) ? z : T(0)) + log1p_(exp_(-abs_(z)))", "-expm1_(-a)")),
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

# Optimizer update rules (kernels/*/optim) and the slots of their per-update
# hyper-parameter row ``hp`` (float64, HP_SIZE long; each rule reads its own).
SGD, ADAM, ADAMW, RMSPROP = range(4)
RULES = {"sgd": SGD, "adam": ADAM, "adamw": ADAMW, "rmsprop": RMSPROP}
N_RULES = len(RULES)

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


def dropout_key(seed, layer, counter):
    """The 64-bit key (an int) of ``layer``'s mask at dropout step ``counter``
    of a model seeded ``seed``; pass it on as ``np.uint64``."""
    k = _fin((int(seed) + _GOLDEN) & _M64)
    k = _fin(((k ^ int(layer)) + _GOLDEN) & _M64)
    return _fin(((k ^ int(counter)) + _GOLDEN) & _M64)


def dropout_threshold(p):
    """uint64 threshold on the 53 drawn bits: keep iff bits >= it (0: keep all)."""
    import math

    import numpy as np
    return np.uint64(math.ceil(float(p) * 2.0 ** 53))

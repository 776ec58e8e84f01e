"""The activation registry and the neutral spec: one table, read everywhere.

* kernels/spec.py against the C++ enums (common.cuh, norm.cu) and the CUDA
  instantiation lists; kernels/cuda never imports kernels/cpu;
* the update-rule table (spec.UPDATE_RULES) against the CUDA rule lists, the
  optimizer classes of fastgrad.optim and fastgrad.torch, torch.optim's own
  classes (defaults, group keys, state names) and the CLI;
* every ladder refuses an unknown code instead of computing some activation;
* the registry against its readers (ops, CLI, interop, reference);
* exact GELU against PyTorch and JAX, gelu_tanh against the tanh form;
* fg.register_activation end to end: swish written as two Numba scalar
  functions matches PyTorch's SiLU to 1e-10 in float64 through TrainStep,
  forward/backward and a layer with epilogue pieces.
"""
import ast
import pathlib
import re

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import ops, reference, registry
from fastgrad.kernels import spec
from fastgrad.kernels.cpu import activations as A

from conftest import ACTIVATIONS, to_numpy, torch_activation

KERNELS = pathlib.Path(spec.__file__).parent


def _torch():
    return pytest.importorskip(
        "torch", reason="PyTorch parity test: torch is not installed (pip install 'fastgrad[peers]')")


# --- the spec and its C++ mirrors ------------------------------------------------------

def _enums(path, text=None):
    """{NAME: value} of every ``enum { A = 0, B = 1, ... };`` in a CUDA source."""
    text = re.sub(r"//[^\n]*", "", (KERNELS / "cuda" / path).read_text() if text is None else text)
    out = {}
    for body in re.findall(r"enum\s*\{([^}]*)\}", text):
        for item in body.split(","):
            if item.strip():
                name, value = (s.strip() for s in item.split("="))
                assert name not in out, f"{path}: {name} defined twice"
                out[name] = int(value)
    return out


def _cuda_module():
    return pytest.importorskip("fastgrad.kernels.cuda._module",
                               reason="the CUDA loader needs CuPy (pip install 'fastgrad[cuda]')")


def test_cuda_enums_match_the_spec():
    common = _enums("common.cuh")
    # the activation codes: generated from the spec into what NVRTC compiles
    # (and nvcc checks); no hand-written copy may remain beside them
    compiled = _enums("activations.cu", _cuda_module().source("activations.cu"))
    assert {k: compiled[k] for k in map(str.upper, spec.CODES)} == \
        {name.upper(): code for name, code in spec.CODES.items()}
    assert _enums("activation.cuh") == {}
    rules = {k: v for k, v in common.items() if not k.startswith(("HP_", "CTL_", "ERR_"))}
    assert rules == {k.upper(): v for k, v in spec.RULES.items()}
    hp = {k: v for k, v in common.items() if k.startswith("HP_")}
    assert hp == spec.hp_slots()
    norm = _enums("norm.cu")
    assert (norm["NO_NORM"], norm["LAYER"], norm["BATCH"]) == (spec.NO_NORM, spec.LAYER, spec.BATCH)


@pytest.mark.parametrize("filename", ["activations.cu", "blocks.cu", "norm.cu"])
def test_every_activation_has_its_cuda_specialisation(filename):
    """What NVRTC compiles (and nvcc checks) has one fg::Act<NAME> per spec
    row, generated from its CUDA forms, and FG_EACH_ACTIVATION lists every
    code in spec order; activation.cuh has no primary definition (an
    unknown code cannot compile, let alone fall through) and no hand-written
    specialisation."""
    m = _cuda_module()
    text = m.source(filename)
    found = re.findall(r"template <> struct Act<(\w+)>", text)
    assert found == [n.upper() for n in spec.CODES]
    each = re.search(r"#define FG_EACH_ACTIVATION\(M, T\)([^\n]*)", text).group(1)
    assert re.findall(r"M\(T, fg::(\w+)\)", each) == [n.upper() for n in spec.CODES]
    for a in spec.ACTIVATIONS:
        assert len(a.cuda) == 2 and all(isinstance(form, str) and form for form in a.cuda)
        block = text[text.index(f"struct Act<{a.name.upper()}>"):]
        block = block[:block.index("};")]
        assert f"needs_z = {'true' if a.needs == 'z' else 'false'};" in block
        for form in a.cuda:
            assert all(line in block for line in form.splitlines()), (a.name, form)
    cuh = re.sub(r"//[^\n]*", "", (KERNELS / "cuda" / "activation.cuh").read_text())
    assert re.search(r"template <int ACT> struct Act;", cuh)
    assert not re.search(r"template <int ACT> struct Act\s*\{", cuh)
    assert not re.search(r"struct Act<\w+>", cuh) and "FG_EACH_ACTIVATION" not in cuh
    assert registry.get("gelu").cuda == "GELU"


def test_committed_activation_table_is_the_generated_one():
    """kernels/cuda/activation_table.cuh (what nvcc reads when it compiles a
    .cu as it stands) is exactly what the spec generates for the built-ins."""
    m = _cuda_module()
    committed = (KERNELS / "cuda" / "activation_table.cuh").read_text()
    assert committed == m.activation_source(registered=False), (
        "activation_table.cuh is stale: run python -c \"from fastgrad.kernels.cuda "
        "import _module; _module.write_activation_table()\"")


def test_emitted_cuda_sources_are_what_nvrtc_compiles(tmp_path):
    """_module.emit writes every .cu as NVRTC gets it, self-contained (no
    local include left): the files .ci/run compiles with nvcc."""
    m = _cuda_module()
    written = m.emit(tmp_path)
    names = sorted(p.name for p in (KERNELS / "cuda").glob("*.cu"))
    assert [p.name for p in written] == names
    for path in written:
        text = path.read_text()
        assert text == m.source(path.name)
        assert not re.search(r'^\s*#include\s+"', text, re.M), path.name
    emitted = (tmp_path / "activations.cu").read_text()
    assert "FG_EACH_ACTIVATION(M, T) M(T, fg::IDENTITY)" in emitted


def test_kernels_cuda_never_imports_kernels_cpu():
    for path in sorted((KERNELS / "cuda").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                bad = (node.level >= 2 and (mod == "cpu" or mod.startswith("cpu."))) or \
                      (node.level == 1 and mod.startswith("cpu")) or "kernels.cpu" in mod
                names = [a.name for a in node.names]
                bad = bad or (node.level == 2 and not mod and "cpu" in names)
                assert not bad, f"{path.name}:{node.lineno} imports {'.' * node.level}{mod}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert "kernels.cpu" not in a.name, f"{path.name}:{node.lineno}"


def test_every_rule_has_its_cuda_update():
    """FG_EACH_RULE (nvcc's instantiation lists of optim.cu and
    multi_tensor.cu) names every rule in code order, and fg::rule_update has
    one branch per rule and no default: another code does not compile."""
    common = re.sub(r"//[^\n]*", "", (KERNELS / "cuda" / "common.cuh").read_text())
    each = re.search(r"#define FG_EACH_RULE\(M, T\)(.*)", common).group(1)
    assert re.findall(r"M\(T, fg::(\w+)\)", each) == [n.upper() for n in spec.RULES]
    for path, inst in (("optim.cu", "FG_INST"), ("multi_tensor.cu", "FG_MT_INST")):
        text = (KERNELS / "cuda" / path).read_text()
        for t in ("float", "double"):
            assert f"FG_EACH_RULE({inst}, {t})" in text, path
        assert not re.search(inst + r"\((float|double), \d+\)", text), path
    text = (KERNELS / "cuda" / "optim.cuh").read_text()
    body = text[text.index("void rule_update"):]
    assert sorted(re.findall(r"if constexpr \(RULE == (\w+)\)", body)) == \
        sorted(n.upper() for n in spec.RULES)
    assert re.search(r"else static_assert\(unknown_rule<RULE>", body)


@pytest.mark.cuda
def test_cuda_instantiation_lists_cover_the_spec():
    from fastgrad.kernels.cuda import _module
    for t in ("float", "double"):
        for kernel, fname in (("fg_update", "optim.cu"), ("fg_mt_update", "multi_tensor.cu")):
            have = [n for n in _module.NAMES[fname] if n.startswith(f"{kernel}<{t}, ")]
            assert have == [f"{kernel}<{t}, {r}>" for r in range(spec.N_RULES)]
    for t in ("float", "double"):
        for code in range(spec.N_ACTIVATIONS):
            for name, fname in ((f"fg_bias_act<{t}, {code}>", "activations.cu"),
                                (f"fg_bias_act_grad<{t}, {code}>", "activations.cu"),
                                (f"fg_block_fwd<{t}, {code}>", "blocks.cu"),
                                (f"fg_norm_grad_unit<{t}, {code}>", "norm.cu")):
                assert name in _module.NAMES[fname]
        assert f"fg_bias_act<{t}, {spec.N_ACTIVATIONS}>" not in _module.NAMES["activations.cu"]
    assert _module.N_ACTIVATIONS == spec.N_ACTIVATIONS


@pytest.mark.cuda
def test_cuda_model_refuses_a_registered_activation_without_cuda_forms(cp, swish):
    with pytest.raises(ValueError, match="cannot run on CUDA.*cuda="):
        fg.MLP([3, 4, 2], activation=swish, device="cuda")


@pytest.mark.cuda
def test_registered_activation_with_cuda_forms_runs_on_cuda(cp, rng):
    """swish's CUDA forms, compiled into the activation kernels: a plain and
    a CUDA model with epilogue pieces give the CPU's silu model's forward, backward and
    3 TrainSteps to 1e-10 (float64)."""
    f, df = _swish_functions()
    cuda = ("z / (T(1) + exp_(-z))",
            "(T(1) / (T(1) + exp_(-z))) * (T(1) + z * (T(1) - T(1) / (T(1) + exp_(-z))))")
    name = "swish_cuda"
    registry.register_activation(name, f, df, needs="z", cuda=cuda)
    try:
        x = rng.standard_normal((6, 5))
        y = rng.integers(0, 3, 6)
        for kw in ({}, {"norm": "layer", "residual": True}):
            sizes = [5, 7, 7, 3] if kw else [5, 7, 3]
            gpu = fg.MLP(sizes, activation=name, dtype="float64", seed=2, device="cuda", **kw)
            cpu = fg.MLP(sizes, activation="silu", dtype="float64", seed=2, **kw)
            cpu.params[...] = to_numpy(gpu.params)
            close = dict(rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(to_numpy(gpu.forward(cp.asarray(x))), cpu.forward(x),
                                       **close)
            dy = rng.standard_normal((6, 3))
            np.testing.assert_allclose(to_numpy(gpu.backward(cp.asarray(dy))), cpu.backward(dy),
                                       **close)
            np.testing.assert_allclose(to_numpy(gpu.grads), cpu.grads, **close)
            steps = [fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.SGD(m, lr=0.1))
                     for m in (cpu, gpu)]
            for _ in range(3):
                for st in steps:
                    st(x, y)
            np.testing.assert_allclose(to_numpy(gpu.params), cpu.params, **close)
    finally:
        registry._forget(name)


# --- unknown codes raise -----------------------------------------------------------------

BAD_CODES = (spec.N_ACTIVATIONS, 42, spec.FIRST_CUSTOM_CODE + 7, -1)


@pytest.mark.parametrize("bad", BAD_CODES)
def test_every_cpu_ladder_refuses_an_unknown_code(rng, bad):
    """Each ladder (plain bias+act and its gradient, the block rows, the
    norm rows, both whole steps) raises on a code outside the table: none
    computes a default activation.  Forward ladders are reached with the
    bad code, backward ones after a good forward."""
    x = rng.standard_normal((5, 4))
    y = np.array([0, 1, 2, 0, 1])
    for kw in ({}, {"dropout": 0.1}, {"norm": "layer"}, {"norm": "batch", "residual": True}):
        model = fg.MLP([4, 4, 3], activation="relu", dtype="float64", seed=1, **kw)
        # (object.__setattr__: past the guard that fixes a placed layer's code)
        object.__setattr__(model.layers[0], "code", bad)
        with pytest.raises(ValueError, match="unknown activation code"):
            model.forward(x)
        object.__setattr__(model.layers[0], "code", spec.RELU)
        model.forward(x)
        object.__setattr__(model.layers[0], "code", bad)
        with pytest.raises(ValueError, match="unknown activation code"):
            model.backward(np.ones((5, 3)))
        object.__setattr__(model.layers[0], "code", bad)
        with pytest.raises(ValueError, match="unknown activation code"):
            fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))(x, y)
    z, b = rng.standard_normal((3, 5)), rng.standard_normal(5)
    with pytest.raises(ValueError, match="unknown activation code"):
        A.bias_act(z.copy(), b, np.empty_like(z), bad, 0.0)       # z kept apart
    zz = z.copy()
    with pytest.raises(ValueError, match="unknown activation code"):
        A.bias_act(zz, b, zz, bad, 0.0)                            # in place
    with pytest.raises(ValueError, match="unknown activation code"):
        A.bias_act_grad(z.copy(), z, z, np.empty_like(z), np.empty(5), bad, 0.0)


def test_the_ladders_are_generated_from_the_table():
    """One branch per table row, then a raise: the ladder's source names
    every code and ends in the unknown-code error."""
    assert [e[0] for e in A.ENTRIES] == list(range(spec.N_ACTIVATIONS))
    for code, f, df, keep_z in A.ENTRIES:
        name = spec.ACTIVATIONS[code].name
        assert f is getattr(A, name) and df is getattr(A, "d_" + name)
        assert keep_z == (code in spec.NEEDS_Z) == bool(A.needs_z(code))
    assert not A.needs_z(spec.N_ACTIVATIONS)


# --- the registry and its readers ----------------------------------------------------------

def test_registry_is_the_one_list(rng):
    names = [s.name for s in registry.specs() if s.builtin]
    assert tuple(names) == ACTIVATIONS == tuple(a.name for a in spec.ACTIVATIONS)
    for s in registry.specs():
        if not s.builtin:
            continue
        assert ops.resolve_activation(s.name) == (s.code, s.alpha or 0.0)
        assert s.needs_z == (s.code in ops.NEEDS_Z) == ops.needs_z(s.code)
        z = rng.standard_normal(7)
        np.testing.assert_array_equal(reference.activation(z, s.name), s.reference[0](z, None))
    from fastgrad import cli
    demo = cli.build_parser()._subparsers._group_actions[0].choices["demo"]
    act = next(a for a in demo._actions if a.dest == "activation")
    assert list(act.choices) == registry.names()
    opt = next(a for a in demo._actions if a.dest == "optimizer")
    assert tuple(opt.choices) == tuple(spec.RULES)
    with pytest.raises(ValueError,
                       match=r"unknown activation 'nope'; expected one of \[.*'gelu_tanh'"):
        ops.resolve_activation("nope")


def test_torch_twins_map_both_ways():
    torch = _torch()
    for name in ACTIVATIONS:
        model = fg.MLP([3, 4, 2], activation=name, dtype="float64", seed=0)
        seq = fg.interop.to_torch(model)
        back = fg.from_torch(seq)
        assert back.layers[0].activation == name, name
        if name != "identity":
            assert type(seq[1]) is type(torch_activation(name))
    gelu = fg.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU()))
    assert gelu.layers[0].activation == "gelu"
    approx = fg.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 4),
                                                torch.nn.GELU(approximate="tanh")))
    assert approx.layers[0].activation == "gelu_tanh"
    assert fg.interop.to_torch(gelu)[1].approximate == "none"
    assert fg.interop.to_torch(approx)[1].approximate == "tanh"


# --- the update-rule table and its readers -------------------------------------------------

_COMMON_HYPER = {"lr", "maximize", "clip_norm", "clip_value", "skip_nonfinite"}
_CALLER_SLOTS = {spec.HP_LR, spec.HP_UPDATE, spec.HP_MAXIMIZE, spec.HP_END}


def test_rule_table_is_consistent():
    """Codes are row indices; each rule's values fill distinct slots of hp
    (none of the caller's), exactly the ones it declares; its buffers fit
    the kernels' three slots and depend on its own hyper-parameters."""
    for code, row in enumerate(spec.UPDATE_RULES):
        assert spec.RULES[row.name] == code
        names = [h.name for h in row.hyper]
        assert len(set(names)) == len(names) and not set(names) & _COMMON_HYPER, row.name
        slots = [s for h in row.hyper for s in h.slots] + [s for s, _ in row.per_update]
        assert len(set(slots)) == len(slots), row.name
        assert all(0 <= s < spec.HP_SIZE for s in slots) and not set(slots) & _CALLER_SLOTS
        for h in row.hyper:
            assert h.check in fg.optim._CHECKS, (row.name, h.name)
            assert len(h.slots) == (len(h.default) if isinstance(h.default, tuple) else 1)
        assert len(row.state) <= spec.N_STATE_SLOTS
        assert all(st.when is None or st.when in names for st in row.state)
        hp = np.full(spec.HP_SIZE, np.nan)
        spec.fill_hp(code, hp, {h.name: h.default for h in row.hyper}, 1)
        assert set(np.flatnonzero(~np.isnan(hp))) == set(slots), row.name
        assert spec.rule_state(code, {h.name: h.default for h in row.hyper}) == tuple(
            st.name for st in row.state if st.when is None)


def test_optimizer_classes_follow_the_rule_table():
    """fastgrad.optim has one class per rule, its code, state names and
    hyper-parameters (the constructor's defaults too) from the table; the
    CLI and checkpoints read the same classes; a class naming no rule of
    the table is refused when it is defined."""
    import inspect
    from fastgrad import cli, io
    classes = fg.optim.optimizer_classes()
    assert list(classes) == list(spec.RULES) == list(cli.OPTIMIZERS)
    assert io._optimizer_classes() == classes
    for code, row in enumerate(spec.UPDATE_RULES):
        cls = classes[row.name]
        assert getattr(fg, cls.__name__) is cls
        assert cls.kind == row.name and cls.rule == code
        assert cls.state_names == tuple(st.name for st in row.state)
        assert cls._defaults == {h.name: h.default for h in row.hyper}
        sig = inspect.signature(cls).parameters
        assert sig["lr"].default == row.lr
        assert {h.name: sig[h.name].default for h in row.hyper} == cls._defaults
    with pytest.raises(ValueError, match="'lion' is not an update rule"):
        type("Lion", (fg.optim.Optimizer,), {"kind": "lion"})
    assert "lion" not in fg.optim.optimizer_classes()
    mine = type("MyAdam", (fg.Adam,), {"kind": "adam"})      # a user's subclass
    assert mine.state_names == fg.Adam.state_names and fg.optim.optimizer_classes() == classes


def _on_value(row, name):
    """A value of hyper-parameter ``name`` that turns its buffers on."""
    h = next(h for h in row.hyper if h.name == name)
    return True if h.check == "flag" else 0.5


@pytest.mark.parametrize("name", [r.name for r in spec.UPDATE_RULES if r.torch])
def test_rule_table_matches_torch(name):
    """Each rule's row against the torch.optim class it mirrors: defaults,
    param_groups keys, and the state torch keeps after a step with every
    buffer-switching option off and each one on -- which fastgrad.optim
    keeps too, and fastgrad.torch under torch's own names."""
    import inspect
    torch = _torch()
    import fastgrad.torch as fgt
    code, row = spec.RULES[name], spec.UPDATE_RULES[spec.RULES[name]]
    tcls = getattr(torch.optim, row.torch.cls)
    sig = inspect.signature(tcls).parameters
    assert sig["lr"].default == row.lr
    assert {h.name: sig[h.name].default for h in row.hyper} == {h.name: h.default for h in row.hyper}
    ours = getattr(fgt, row.torch.cls)
    assert name in ours._rules
    ours_sig = inspect.signature(ours).parameters
    assert {k: ours_sig[k].default for k in sig if k != "params"} == \
        {k: v.default for k, v in sig.items() if k != "params"}
    group = tcls([torch.nn.Parameter(torch.zeros(3))]).param_groups[0]
    assert set(group) == {"params", "lr", "maximize"} | {h.name for h in row.hyper} | set(
        row.torch.group_keys)
    assert {k: group[k] for k in row.torch.group_keys} == row.torch.group_keys
    options = [{}] + [{st.when: _on_value(row, st.when)} for st in row.state if st.when]
    for opt in options:
        g = np.linspace(-1.0, 1.0, 3)
        tp = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        tp.grad = torch.tensor(g)
        topt = tcls([tp], **opt)
        topt.step()
        kept = {k for k, v in topt.state[tp].items() if v is not None}
        assert ("step" in kept) == row.torch.counts_steps, opt
        fopt = fg.optim.optimizer_classes()[name]([(np.ones(3), g.copy())], **opt)
        fopt.step()
        assert set(fopt.state) == kept - {"step"}, opt
        values = dict(fopt.hyper)
        assert set(spec.rule_state(code, values)) == set(fopt.state), opt
        fp = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        fp.grad = torch.tensor(g)
        f_topt = ours([fp], **opt)
        f_topt.step()
        assert {k for k, v in f_topt.state[fp].items() if v is not None} == kept, opt


def test_fastgrad_torch_covers_every_rule():
    _torch()
    import fastgrad.torch as fgt
    covered = [r for n in fgt.__all__ for r in getattr(getattr(fgt, n), "_rules", ())]
    assert sorted(set(covered)) == sorted(r.name for r in spec.UPDATE_RULES if r.torch)


# --- exact GELU --------------------------------------------------------------------------

def _gelu_inputs(rng, dtype):
    z = np.concatenate([rng.standard_normal(2000) * 3, np.linspace(-12, 12, 4001),
                        [0.0, -0.0, 1e-30, -1e-30, 1e3, -1e3, 40.0, -40.0, -8.0, 8.0]])
    return z.astype(dtype)


def _ours(z, name):
    z2 = np.ascontiguousarray(z).reshape(1, -1)
    a = ops.activation_forward(z2, name)
    g = ops.activation_backward(np.ones_like(z2), a, z2, name)
    return a.ravel(), g.ravel()


@pytest.mark.parametrize("name, approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_gelu_float64_matches_torch_and_reference(rng, name, approximate):
    """float64: to 1e-12 of PyTorch's nn.GELU(approximate=...) forward and
    gradient (absolute + relative), and of fastgrad.reference."""
    torch = _torch()
    z = _gelu_inputs(rng, np.float64)
    a, g = _ours(z, name)
    zt = torch.tensor(z, requires_grad=True)
    at = torch.nn.functional.gelu(zt, approximate=approximate)
    at.sum().backward()
    np.testing.assert_allclose(a, at.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, zt.grad.numpy(), rtol=1e-12, atol=1e-12)
    # float64 rounding of the argument moves erfc / tanh by ~z^2 ulps; gelu_tanh's
    # 1 + t and f' cancel for z << 0 (and f' around z = -0.75); 1 - t^2 near |t| = 1
    # is tanh's last ulp: 1e-15 and 1e-14 absolute
    tol = 4e-16 * (1 + z * z)
    assert np.all(np.abs(a - reference.activation(z, name)) <= tol * np.abs(a) + 1e-15)
    assert np.all(np.abs(g - reference.activation_grad(z, name)) <= tol * np.abs(g) + 1e-14)


def test_gelu_exact_reference_is_exact():
    """The reference's z Phi(z) against mpmath at 50 digits (where torch's
    1 + erf form cancels: z << 0)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    z = np.array([-30.0, -12.0, -5.5, -1.0, -1e-8, 0.3, 2.0, 9.0])
    want = np.array([float(mpmath.mpf(v) * mpmath.ncdf(mpmath.mpf(v))) for v in z])
    # a few ulps, times z^2: the rounding of -z / sqrt 2 (erfc's condition number)
    tol = 4.5e-16 * (1 + z * z) * np.abs(want)
    assert np.all(np.abs(reference.activation(z, "gelu") - want) <= tol)
    a, _ = _ours(z, "gelu")
    assert np.all(np.abs(a - want) <= tol)


GELU_F32_RTOL = 2e-6     # erfc <= 6.5 ulp, times the 1.5 ulp of -z / sqrt 2 amplified by z^2


def test_gelu_float32_within_stated_error(rng):
    """float32 kernels against the float64 reference at the float32 inputs:
    relative 2e-6 plus what z's own rounding can move the result (|z f'(z)|
    ulps), absolute 1e-37 for the underflowing tail."""
    z = _gelu_inputs(rng, np.float32)
    a, g = _ours(z, "gelu")
    z64 = z.astype(np.float64)
    want_a, want_g = reference.activation(z64, "gelu"), reference.activation_grad(z64, "gelu")
    cond = 1.0 + z64 * z64          # relative sensitivity of erfc(-z/sqrt2) to z's rounding
    tol_a = GELU_F32_RTOL * cond * np.abs(want_a) + 1e-37
    assert np.all(np.abs(a - want_a) <= tol_a)
    tol_g = GELU_F32_RTOL * cond * (np.abs(want_g) + np.abs(z64 * np.exp(-0.5 * z64 * z64))) + 1e-37
    assert np.all(np.abs(g - want_g) <= tol_g)
    special, dspecial = _ours(np.array([np.inf, -np.inf, np.nan, 0.0], np.float32), "gelu")
    assert special[0] == np.inf and np.isnan(special[1]) and np.isnan(special[2])
    assert special[3] == 0
    assert np.isnan(dspecial[0]) and dspecial[3] == 0.5


@pytest.mark.parametrize("name, approximate", [("gelu", False), ("gelu_tanh", True)])
def test_gelu_matches_jax(rng, name, approximate):
    jax = pytest.importorskip("jax", reason="JAX parity test: jax is not installed")
    jax.config.update("jax_enable_x64", True)
    z = np.linspace(-6, 6, 1001)
    a, g = _ours(z, name)
    f = lambda v: jax.nn.gelu(v, approximate=approximate)       # noqa: E731
    ja = np.asarray(f(jax.numpy.asarray(z)))
    jg = np.asarray(jax.vmap(jax.grad(f))(jax.numpy.asarray(z)))
    np.testing.assert_allclose(a, ja, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g, jg, rtol=1e-12, atol=1e-13)
    assert registry.get(name).jax.kwargs == {"approximate": approximate}


# --- register_activation ------------------------------------------------------------------

def _swish_functions():
    from numba import njit

    @njit
    def f(z, alpha):
        return z / (1.0 + np.exp(-z))

    @njit
    def df(a, z, alpha):
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))

    return f, df


@pytest.fixture
def swish():
    f, df = _swish_functions()
    name = "swish_test"
    registry.register_activation(
        name, f, df, needs="z",
        torch=registry.TorchTwin("SiLU", {}, None),
        reference=(lambda z, al: z / (1.0 + np.exp(-z)),
                   lambda z, al: (1 / (1 + np.exp(-z))) * (1 + z * (1 - 1 / (1 + np.exp(-z))))))
    yield name
    registry._forget(name)


def test_fused_mlp_refuses_a_registered_activation(swish):
    """FusedMLP's kernels serve the built-in activations: a registered one is
    refused when the module is built (it failed at the first forward, with
    a message naming kernels/spec.py)."""
    pytest.importorskip("torch")
    from fastgrad import torch as fgt
    for kw in (dict(activation=swish), dict(output_activation=swish)):
        with pytest.raises(ValueError, match="registered one"):
            fgt.FusedMLP([3, 4, 2], **kw)


def test_register_refuses_clashes_and_bad_arguments(swish):
    f, df = _swish_functions()
    with pytest.raises(ValueError, match="built-in"):
        fg.register_activation("relu", f, df)
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        fg.register_activation(swish, f, df)
    old = registry.get(swish)
    new = fg.register_activation(swish, f, df, needs="z", replace=True)
    assert new.code == old.code and registry.get(swish) is new and not new.builtin
    with pytest.raises(ValueError, match="needs must be 'a' or 'z'"):
        fg.register_activation("other_test", f, df, needs="x")
    with pytest.raises(TypeError, match="f must be"):
        fg.register_activation("other_test", 3, df)
    with pytest.raises(ValueError, match="identifier"):
        fg.register_activation("not a name", f, df)
    assert registry.get("other_test") is None
    assert ops.resolve_activation(swish)[0] >= spec.FIRST_CUSTOM_CODE


def test_register_refuses_what_would_break_other_models(swish):
    """Checked at registration (they were taken, then failed later with a
    Numba TypingError that named neither, in the one kernel copy every
    registered activation shares, so a healthy one's models failed too):
    a function that does not compile or returns no number, df written with
    reference's (z, alpha) signature, a malformed torch twin.  A plain tuple
    twin is taken as kernels/spec.py's rows are.  And replace=True while a
    live model uses the activation (its paths would run old and new)."""
    f, df = _swish_functions()

    def returns_text(z, alpha):
        return "z"

    def two_args(z, alpha):
        return 1.0
    for kw, match in ((dict(f=returns_text, df=df), r"f\(z, alpha\) must return a number"),
                      (dict(f=f, df=two_args), r"df\(a, z, alpha\) does not compile"),
                      (dict(f=f, df=df, torch=("SiLU", {})), "torch must be"),
                      (dict(f=f, df=df, torch=("SiLU", [], None)), "torch must name"),
                      (dict(f=f, df=df, jax=(3, {})), "jax must name")):
        with pytest.raises(TypeError, match=match):
            fg.register_activation("broken_test", **kw)
        assert registry.get("broken_test") is None
    model = fg.MLP([3, 4, 2], activation=swish, dtype="float64")
    model.predict(np.ones((2, 3)))                      # the healthy one still runs
    with pytest.raises(ValueError, match="used by 1 live model"):
        fg.register_activation(swish, f, df, needs="z", replace=True)
    del model
    spec_ = fg.register_activation(swish, f, df, needs="z", torch=("SiLU", {}, None),
                                   replace=True)
    assert spec_.torch == registry.TorchTwin("SiLU", {}, None)


def test_to_torch_names_a_twin_torch_does_not_have(swish):
    pytest.importorskip("torch")
    f, df = _swish_functions()
    fg.register_activation("twinless_test", f, df, needs="z",
                           torch=registry.TorchTwin("NoSuchModule", {}, None))
    try:
        model = fg.MLP([3, 4, 2], activation="twinless_test", dtype="float64")
        with pytest.raises(ValueError, match="torch.nn.NoSuchModule"):
            model.to_torch()
        del model
    finally:
        registry._forget("twinless_test")


@pytest.mark.slow
def test_registered_swish_matches_torch_silu(rng, swish):
    """The issue's "done when": swish as two Numba scalar functions, in
    float64, matches PyTorch's SiLU to 1e-10 through TrainStep (5 SGD steps),
    forward/backward, the functional ops, and a model with epilogue pieces (layer norm,
    residual block, dropout off) through its own fused step."""
    torch = _torch()
    x = rng.standard_normal((6, 5))
    y = rng.integers(0, 3, 6)
    close = dict(rtol=1e-10, atol=1e-12)
    for kw in ({}, {"norm": "layer", "residual": True}):
        sizes = [5, 7, 7, 3] if kw else [5, 7, 3]
        ours = fg.MLP(sizes, activation=swish, dtype="float64", seed=2, **kw)
        twin = fg.MLP(sizes, activation="silu", dtype="float64", seed=2, **kw)
        twin.params[...] = ours.params
        seq = fg.interop.to_torch(twin)
        # forward / backward against torch
        dy = rng.standard_normal((6, 3))
        out = ours.forward(x)
        dx = ours.backward(dy)
        xt = torch.tensor(x, requires_grad=True)
        yt = seq(xt)
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(out, yt.detach().numpy(), **close)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **close)
        for p_ours, layer in zip([l for l in seq.modules() if isinstance(l, torch.nn.Linear)],
                                 ours.layers):
            np.testing.assert_allclose(layer.dW, p_ours.weight.grad.numpy().T, **close)
            np.testing.assert_allclose(layer.db, p_ours.bias.grad.numpy(), **close)
        # the compiled TrainStep: 5 SGD steps against torch's
        step = fg.TrainStep(ours, fg.SoftmaxCrossEntropy(), fg.SGD(ours, lr=0.1))
        topt = torch.optim.SGD(seq.parameters(), lr=0.1)
        for _ in range(5):
            loss = step(x, y)
            topt.zero_grad()
            tl = torch.nn.functional.cross_entropy(seq(torch.tensor(x)), torch.tensor(y))
            tl.backward()
            topt.step()
            assert loss == pytest.approx(tl.item(), rel=1e-10)
        np.testing.assert_allclose(ours.params, fg.from_torch(seq).params, **close)
    # the functional ops, against the reference given at registration
    z = rng.standard_normal((4, 9))
    a, zk = ops.dense_forward(x[:4], rng.standard_normal((5, 9)), np.zeros(9), swish)
    assert zk is not None
    g = ops.activation_backward(np.ones_like(z), ops.activation_forward(z, swish), z, swish)
    np.testing.assert_allclose(g, reference.activation_grad(z, swish), **close)
    np.testing.assert_allclose(ops.activation_forward(z, swish), reference.activation(z, "silu"),
                               **close)


def test_builtin_models_keep_the_builtin_kernels(swish, per_model_copies):
    """Registering an activation changes nothing for models without it: they
    run the disk-cached copy compiled for their own activations (built-in
    codes only), not the registry's uncached copy."""
    model = fg.MLP([4, 5, 3], activation="relu", dtype="float64")
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))
    pkg = model._kernels()
    assert pkg.__name__.startswith("fastgrad.kernels._cpu_")
    assert pkg._ONLY_ACTIVATIONS == {spec.CODES["relu"], spec.CODES["identity"]}
    # the step's copy: the same activations, and SGD, the loss and no layer
    # feature alone
    stepkg = registry.cpu_kernels([spec.RELU, spec.IDENTITY], rules=[spec.SGD],
                                  losses=[spec.CROSS_ENTROPY], features=(),
                                  team=fg.threads.team_threads() > 0)
    assert step._kernels is stepkg.step and step._ksharded is stepkg.step_sharded
    assert stepkg.step.SERVED_FEATURES == ()
    assert stepkg._ONLY_ACTIVATIONS == pkg._ONLY_ACTIVATIONS
    assert stepkg._ONLY_RULES == {spec.SGD} and stepkg._ONLY_LOSSES == {spec.CROSS_ENTROPY}
    for p in (pkg, stepkg):
        assert "_NO_DISK_CACHE" not in vars(p)
    assert registry.cpu_kernels().__name__.startswith("fastgrad.kernels._registered")



# -- copies of the kernels compiled for one model's activations ----------------

def test_model_kernels_compile_only_the_model_activations(per_model_copies):
    relu = fg.MLP([3, 4, 2], activation="relu")._kernels()
    assert fg.MLP([5, 6, 6, 2], activation="relu")._kernels() is relu      # same set, same copy
    tanh = fg.MLP([3, 4, 2], activation="tanh")._kernels()
    assert tanh is not relu and tanh._ONLY_ACTIVATIONS == {spec.CODES["tanh"],
                                                           spec.CODES["identity"]}
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        relu.bias_act(z, np.zeros(3), z, spec.CODES["tanh"], 0.0)


_SUBSET_PROBE = """
import sys, numpy as np
from fastgrad import ops, reference
name = sys.argv[1]
pkg = ops.model_kernels("cpu", [ops.resolve_activation(name)[0]])
z = np.linspace(-3, 3, 12).reshape(3, 4)
out = np.empty_like(z)
pkg.bias_act(z.copy(), np.zeros(4), out, ops.resolve_activation(name)[0], 0.0)
np.testing.assert_allclose(out, reference.activation(z, name), rtol=1e-12)
"""


def test_subset_copies_do_not_share_cache_entries(tmp_path):
    """Two copies compile the same files to different code: a second process
    with the same disk cache must load its own entry, not the first's."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for name in ("relu", "tanh", "relu", "tanh"):
        subprocess.run([sys.executable, "-c", _SUBSET_PROBE, name], env=env, check=True,
                       timeout=300)

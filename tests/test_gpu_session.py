"""tools/gpu_session.sh, the one device call a lent GPU gets, and its
pre-flight (tools/gpu_preflight.py): the pre-flight's verdict on the host
emulator, its fast and clear failure when a dependency, the GPU or NVRTC is
missing (simulated by modules that shadow the real ones on PYTHONPATH),
the script stopping right after a failed pre-flight, the script end to end
on the emulator (slow), bench/gpu_targets.py keeping what it measured when
a section fails, and a pyproject.toml that older setuptools accept.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFLIGHT = ROOT / "tools" / "gpu_preflight.py"
SESSION = ROOT / "tools" / "gpu_session.sh"
EMULATOR = ROOT / "tools" / "cuda_emulator"

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator needs g++")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _env(shadow=None, emulate=False):
    """The test's environment for a child: ``shadow`` (a directory of
    stand-in modules) first on PYTHONPATH; the emulator's switches only
    when ``emulate`` (a surrounding emulated run sets them)."""
    env = dict(os.environ)
    env.pop("EMU_CUPY", None)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != EMULATOR]
    if emulate:
        path.insert(0, str(EMULATOR))
        env["EMU_CUPY"] = "1"
    if shadow is not None:
        path.insert(0, str(shadow))
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _preflight(env, *args, timeout=240):
    t = time.perf_counter()
    res = subprocess.run([sys.executable, str(PREFLIGHT), *args], env=env, capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT)
    out = res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    return res.returncode, (lines[-1] if lines else ""), out, time.perf_counter() - t


def _module(root, name, text):
    """Write a stand-in package ``name`` under ``root``."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(text))


# A CuPy that imports and sees a GPU but whose NVRTC library is missing,
# raising what cupy-cuda13x 14.2 raises then (seen without libnvrtc).
NO_NVRTC = """
    import types
    __version__ = "14.2.0-standin"
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        nvrtc=types.SimpleNamespace(getVersion=None))

    class DynamicLibNotFoundError(RuntimeError):
        pass

    def _get_version():
        raise DynamicLibNotFoundError('Failure finding "libnvrtc.so.13 or libnvrtc.so.12"')

    cuda.nvrtc.getVersion = _get_version
"""

# A CuPy whose NVRTC is there and runs CuPy's own kernels, but fails to
# compile the loader's source (CompileException carries NVRTC's log), and
# records the options the loader passed.
BAD_COMPILE = """
    import os
    import types

    import numpy as np

    __version__ = "14.2.0-standin"
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)))


    class ndarray:
        def __init__(self, a):
            self._a = a

        def __mul__(self, k):
            return ndarray(self._a * k)

        def __add__(self, k):
            return ndarray(self._a + k)

        def get(self):
            return self._a.copy()


    def arange(n, dtype=None):
        return ndarray(np.arange(n, dtype=dtype))


    class CompileException(Exception):
        pass


    class RawModule:
        def __init__(self, code=None, options=(), name_expressions=()):
            with open(os.environ["STANDIN_OPTIONS"], "w") as f:
                f.write(" ".join(options))

        def get_function(self, name):
            raise CompileException("default_program(42): error: identifier \\"__fg_bad\\" "
                                   "is undefined\\n1 error detected in the compilation")
"""


@needs_gxx
def test_preflight_passes_on_the_emulator():
    """On the host emulator every stage passes and the verdict says so;
    the probe kernel went through fastgrad's loader."""
    rc, verdict, out, _ = _preflight(_env(emulate=True))
    assert rc == 0, out
    assert verdict.startswith("PREFLIGHT OK"), out
    assert "probe kernel compiled, launched and checked" in out
    assert "MISSING required" not in out


def test_preflight_names_every_missing_dependency(tmp_path):
    """cupy and safetensors shadowed by modules that raise ImportError: the
    verdict names both, the exit code is the dependency stage's, and the
    later stages never run.  Optional packages are then only looked up, not
    imported (torch and jax take seconds), so the verdict comes at once."""
    _module(tmp_path, "cupy", "raise ImportError('simulated: no CuPy on this machine')\n")
    _module(tmp_path, "safetensors", "raise ImportError('simulated: no safetensors')\n")
    rc, verdict, out, _ = _preflight(_env(shadow=tmp_path))
    assert rc == 2, out
    assert verdict.startswith("PREFLIGHT FAILED at dependencies"), out
    assert "cupy (cupy-cuda13x" in verdict and "simulated: no CuPy" in verdict
    assert "safetensors (safetensors" in verdict
    assert "numpy" not in verdict and "numba" not in verdict
    assert "-- GPU" not in out
    if "  ok      torch" in out:
        pytest.fail("torch was imported after a required dependency was missing")


def test_preflight_stops_when_nvrtc_is_missing(tmp_path):
    """CuPy imports and sees a GPU but cannot find libnvrtc: the verdict
    names NVRTC and the library, and the loader stage never runs."""
    _module(tmp_path, "cupy", NO_NVRTC)
    rc, verdict, out, _ = _preflight(_env(shadow=tmp_path), "--required-only")
    assert rc == 4, out
    assert verdict.startswith("PREFLIGHT FAILED at nvrtc: NVRTC not usable"), out
    assert "libnvrtc.so.13" in verdict
    assert "-- fastgrad's loader" not in out


def test_preflight_shows_the_compile_log_when_the_loader_fails(tmp_path):
    """NVRTC is there but the loader's source does not compile: the verdict
    carries NVRTC's log and the loader's options, which are the package's."""
    _module(tmp_path, "cupy", BAD_COMPILE)
    env = _env(shadow=tmp_path)
    env["STANDIN_OPTIONS"] = str(tmp_path / "options.txt")
    rc, verdict, out, _ = _preflight(env, "--required-only")
    assert rc == 5, out
    assert verdict.startswith("PREFLIGHT FAILED at loader"), out
    assert 'identifier "__fg_bad" is undefined' in verdict
    loader = subprocess.run([sys.executable, "-c", "from fastgrad.kernels.cuda import _module; "
                             "print(' '.join(_module._OPTIONS))"], env=env, capture_output=True,
                            text=True, timeout=120, cwd=ROOT / "tests")
    assert loader.returncode == 0, loader.stderr
    assert (tmp_path / "options.txt").read_text() == loader.stdout.strip()
    assert loader.stdout.strip() in verdict


def test_preflight_reports_a_missing_gpu(tmp_path):
    """CuPy imports, but the driver has no device: the GPU stage fails with
    CuPy's own error, before any compilation."""
    _module(tmp_path, "cupy", """
        import types
        __version__ = "14.2.0-standin"

        class CUDARuntimeError(RuntimeError):
            pass

        def _count():
            raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is "
                                   "insufficient for CUDA runtime version")

        cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=_count))
    """)
    rc, verdict, out, _ = _preflight(_env(shadow=tmp_path), "--required-only")
    assert rc == 3, out
    assert verdict.startswith("PREFLIGHT FAILED at gpu: no usable GPU"), out
    assert "cudaErrorInsufficientDriver" in verdict
    assert "-- NVRTC" not in out


def _session(env, out, timeout):
    env = dict(env, OUT=str(out))
    t = time.perf_counter()
    res = subprocess.run(["bash", str(SESSION)], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    return res, time.perf_counter() - t


@needs_bash
def test_session_stops_after_a_failed_preflight(tmp_path):
    """gpu_session.sh with CuPy missing: the pre-flight's verdict and exit
    code end the script; no later stage starts."""
    shadow = tmp_path / "shadow"
    _module(shadow, "cupy", "raise ImportError('simulated: no CuPy on this machine')\n")
    out = tmp_path / "out"
    res, _ = _session(_env(shadow=shadow), out, timeout=240)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "PREFLIGHT FAILED at dependencies" in res.stdout
    assert "stopped after the pre-flight" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["preflight.log", "session.log"]
    assert "== install" not in (out / "session.log").read_text()


@needs_gxx
@needs_bash
@pytest.mark.slow
def test_session_end_to_end_on_the_emulator(tmp_path):
    """The whole script on the emulator with one test selected and the
    install failing (setuptools shadowed by a module that raises): it falls
    back to the source tree, every stage passes, gpu_targets.json is
    complete, and at most 8 files with plain names are left under $OUT
    (what comes back from the device machine)."""
    shadow = tmp_path / "shadow"
    _module(shadow, "setuptools", "raise ImportError('simulated: no setuptools')\n")
    env = _env(shadow=shadow)
    env.update(FG_GPU_EMULATE="1", PY=sys.executable, FG_GPU_WORKERS="1",
               FG_GPU_TESTS="tests/test_step.py::test_step_stats_are_read_only_values[cuda]")
    out = tmp_path / "out"
    res, _ = _session(env, out, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert "PREFLIGHT OK" in log and "WARMUP OK" in log and "SESSION OK" in log
    assert "fastgrad: from the source tree" in log
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(n.replace(".", "").replace("_", "").replace("-", "").isalnum()
                                   for n in files), files
    assert {"session.log", "preflight.log", "warmup.log", "cuda_tests.log", "gpu_targets.log",
            "gpu_targets.json", "bench_cuda.log"} <= set(files)
    assert "1 passed" in (out / "cuda_tests.log").read_text()
    targets = json.loads((out / "gpu_targets.json").read_text())
    assert targets["complete"] and targets["errors"] == 0
    assert [len(targets[k]) for k in ("adam", "forward", "step")] == [1, 1, 3]


@pytest.mark.cuda
def test_gpu_targets_keeps_what_it_measured(cp, tmp_path, monkeypatch):
    """bench/gpu_targets.py: the JSON is on disk after each measurement
    (what a later one sees there), and a measurement that raises is
    recorded with its error while the others still run (exit status 1)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_targets_t", ROOT / "bench" / "gpu_targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "t.json"
    seen = {}

    def broken_forward(*args):
        seen.update(json.loads(path.read_text()))
        raise RuntimeError("simulated failure in the forward section")

    monkeypatch.setattr(mod, "forward_vs_gemm", broken_forward)
    assert mod.main(["--smoke", "--json", str(path)]) == 1
    assert not seen["complete"] and len(seen["adam"]) == 1 and "adam_GBps" in seen["adam"][0]
    res = json.loads(path.read_text())
    assert res["complete"] and res["errors"] == 1
    assert "simulated failure" in res["forward"][0]["error"]
    assert len(res["step"]) == 3 and all("fastgrad_ms" in r for r in res["step"])
    assert not (tmp_path / "t.json.tmp").exists()


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_license_form_older_setuptools_accept():
    """gpu_session.sh installs with --no-build-isolation, i.e. with the
    machine's own setuptools.  setuptools 61-76 reject the SPDX string
    (``license = "MIT"``: "must be valid exactly by one definition"); the
    table form is accepted by those and, with a deprecation warning, by
    setuptools >= 77."""
    meta = _pyproject()
    assert meta["project"]["license"] == {"text": "MIT"}
    assert meta["build-system"]["requires"] == ["setuptools>=64"]    # PEP 660 editable installs


def test_preflight_checks_every_dependency_the_session_needs():
    """Every distribution fastgrad and its cuda and test extras need is
    checked by the pre-flight (so a new dependency cannot be missed there)."""
    import importlib.util
    import re
    spec = importlib.util.spec_from_file_location("gpu_preflight_t", PREFLIGHT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    meta = _pyproject()["project"]
    needed = meta["dependencies"] + meta["optional-dependencies"]["cuda"] + \
        meta["optional-dependencies"]["test"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in needed}
    assert names <= {dist for _, dist, _ in mod.REQUIRED + mod.OPTIONAL}, names

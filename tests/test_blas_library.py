"""fastgrad.set_blas: the CPU kernels' GEMMs on SciPy's OpenBLAS or Intel
MKL.  MKL's cases run in fresh processes (MKL's layers are chosen once per
process) and are skipped where the optional ``mkl`` package is missing."""
import os
import subprocess
import sys
import textwrap

import pytest

import fastgrad as fg
from fastgrad import blas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    environ = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_default_is_scipys_blas():
    from fastgrad.kernels import gemm_library
    assert fg.get_blas() == "openblas"
    assert gemm_library.gemm_addresses() == gemm_library.scipy_gemm()


def test_set_blas_refuses_an_unknown_library():
    with pytest.raises(ValueError, match="openblas"):
        fg.set_blas("accelerate")
    assert fg.get_blas() == "openblas"


def test_set_blas_says_how_to_install_mkl_where_it_is_missing(monkeypatch):
    monkeypatch.setattr(blas, "_find_mkl_rt", lambda: None)
    monkeypatch.setitem(blas._state, "mkl", None)
    with pytest.raises(RuntimeError, match=r"fastgrad\[mkl\]"):
        fg.set_blas("mkl")
    assert fg.get_blas() == "openblas"


def test_set_blas_refuses_intels_openmp_for_mkl():
    out = _run("""
        import fastgrad as fg
        try:
            fg.set_blas("mkl")
        except RuntimeError as exc:
            print("refused:", exc)
        print(fg.get_blas())
    """, MKL_THREADING_LAYER="INTEL")
    assert "refused: set_blas('mkl') needs MKL_THREADING_LAYER=GNU" in out
    assert out.strip().endswith("openblas")


needs_mkl = pytest.mark.skipif(blas._find_mkl_rt() is None,
                               reason="Intel MKL is not installed (pip install fastgrad[mkl])")


@needs_mkl
def test_a_step_on_mkl_matches_openblas_and_repeats_bitwise():
    out = _run("""
        import os
        import numpy as np
        import fastgrad as fg
        from fastgrad.kernels import gemm_library

        def train(dtype, steps=3):
            rng = np.random.default_rng(7)
            x = rng.standard_normal((67, 45)).astype(dtype)
            y = rng.integers(0, 9, 67)
            model = fg.MLP([45, 130, 70, 9], activation="tanh", seed=3, dtype=dtype)
            step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(),
                                fg.Adam(model, lr=1e-2, clip_norm=1.0))
            losses = [float(step(x, y)) for _ in range(steps)]
            return losses, model.params.copy()

        for dtype, rtol in ((np.float32, 2e-4), (np.float64, 1e-11)):
            fg.set_blas("openblas")
            want_losses, want = train(dtype)
            assert fg.set_blas("mkl") == "mkl" and fg.get_blas() == "mkl"
            assert gemm_library.gemm_addresses() != gemm_library.scipy_gemm()
            assert fg.pass_team_status()[1] == "shared pool", fg.pass_team_status()
            losses, got = train(dtype)
            again_losses, again = train(dtype)
            assert losses == again_losses
            np.testing.assert_array_equal(got, again)
            np.testing.assert_allclose(losses, want_losses, rtol=rtol)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
        # the step gave GNU OpenMP's pool (MKL's threads) its mode for its
        # span, and cleared it on return: Numba's parallel loops, on the same
        # pool, find gradual underflow
        from numba import njit, prange
        from fastgrad.kernels import layout
        from fastgrad.kernels.cpu import fpenv

        @njit(parallel=True)
        def pool_modes(n):
            out = np.zeros(n, np.int64)
            for i in prange(n):
                out[i] = fpenv._read_mxcsr() & fpenv.FTZ_DAZ
            return out

        model = fg.MLP([45, 130, 9], seed=3)
        step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model))
        step(np.ones((67, 45), np.float32), np.zeros(67, np.int64))
        plans = [buf[3] for buf in step._buffers.values()]
        assert plans and all(p[layout.PLAN_POOL_GEMM_MODE] == 1 for p in plans)
        assert not pool_modes(64).any()
        fg.set_blas("openblas")
        assert gemm_library.gemm_addresses() == gemm_library.scipy_gemm()
        step(np.ones((67, 45), np.float32), np.zeros(67, np.int64))
        plans = [buf[3] for buf in step._buffers.values()]
        assert all(p[layout.PLAN_POOL_GEMM_MODE] == 0 for p in plans)
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_mkl
def test_a_sharded_step_runs_its_gemms_on_openblas_under_mkl():
    """The sharded step's shards call SciPy's OpenBLAS whatever set_blas
    chose (bitwise the OpenBLAS step's), on a GNU OpenMP team of MKL's pool."""
    out = _run("""
        import numpy as np
        import fastgrad as fg
        from fastgrad import threads
        from fastgrad.kernels import gemm_library, layout

        def train(steps=4):
            rng = np.random.default_rng(5)
            x, y = rng.standard_normal((53, 12)), rng.standard_normal((53, 6))
            model = fg.MLP([12, 40, 33, 6], activation="gelu", seed=2, dtype=np.float64)
            step = fg.TrainStep(model, fg.MSE(), fg.Adam(model, lr=1e-2, clip_norm=1.0),
                                threads=2)
            losses = [float(step(x, y)) for _ in range(steps)]
            losses.append(step.run_epoch(x, y, 16, shuffle=False)["loss"].tolist())
            return losses, model.params.copy(), step._shard_plan_header()[0]

        want_losses, want, header = train()
        assert header[layout.PLAN_POOL_BLAS] != 0          # OpenBLAS's workers
        fg.set_blas("mkl")
        chosen = gemm_library.gemm_addresses()
        losses, got, header = train()
        # the shards' team: a GNU OpenMP team of MKL's pool
        assert header[layout.PLAN_POOL_BLAS] == 0
        assert header[layout.PLAN_POOL_START] == threads.gnu_openmp()["PARALLEL"] != 0
        assert losses == want_losses
        np.testing.assert_array_equal(got, want)
        with threads.sharded_step_blas():
            assert gemm_library.gemm_addresses() == gemm_library.scipy_gemm() != chosen
        assert gemm_library.gemm_addresses() == chosen
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_mkl
def test_fastgrad_blas_in_the_environment_and_a_forked_child():
    out = _run("""
        import os
        import fastgrad as fg
        assert fg.get_blas() == "openblas"
        model = fg.MLP([4, 3], seed=0)
        fg.Adam(model, lr=1e-3)            # the first optimizer reads FASTGRAD_BLAS
        print("parent", fg.get_blas())
        pid = os.fork()
        if pid == 0:
            os.write(1, f"child {fg.get_blas()}\\n".encode())
            os._exit(0)
        os.waitpid(pid, 0)
    """, FASTGRAD_BLAS="mkl")
    assert "parent mkl" in out and "child openblas" in out


def test_import_and_numbas_set_up_leave_scipy_linalg_unimported():
    # SciPy's BLAS module is loaded alone: scipy.linalg's __init__ (most of
    # SciPy's linear algebra, ~110 ms) waits for a user who imports it, also
    # past Numba's own import of the BLAS module before its first compile.
    out = _run("""
        import sys
        import fastgrad
        assert "scipy.linalg.cython_blas" in sys.modules
        assert "scipy.linalg" not in sys.modules, "import fastgrad imported scipy.linalg"
        import numba
        import numpy as np
        assert numba.njit(lambda a: a + 1)(np.ones(3)).sum() == 6
        assert "scipy.linalg" not in sys.modules, "Numba's set-up imported scipy.linalg"
        print("ok")
    """)
    assert out.split() == ["ok"]


def test_scipy_linalg_imported_after_fastgrad_works_as_usual():
    # the module fastgrad loaded is the package's attribute once the package
    # is imported (a plain `import scipy.linalg.cython_blas` then reads it as
    # `scipy.linalg.cython_blas`), its routines are the kernels' GEMMs, and
    # SciPy's linear algebra and Numba's np.dot run
    out = _run("""
        import ctypes, sys
        import numba
        import numpy as np
        import fastgrad
        from fastgrad.kernels import gemm_library
        loaded = sys.modules["scipy.linalg.cython_blas"]
        import scipy.linalg.cython_blas
        assert scipy.linalg.cython_blas is loaded
        import scipy.linalg
        assert scipy.linalg.cython_blas is loaded
        name = ctypes.pythonapi.PyCapsule_GetName
        name.restype, name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        pointer = ctypes.pythonapi.PyCapsule_GetPointer
        pointer.restype, pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        capi = scipy.linalg.cython_blas.__pyx_capi__
        assert gemm_library.gemm_addresses() == {
            r: pointer(capi[r], name(capi[r])) for r in gemm_library.ROUTINES}
        rng = np.random.default_rng(0)
        a = rng.standard_normal((7, 7))
        assert np.allclose(scipy.linalg.solve(a, a), np.eye(7))
        assert np.allclose(scipy.linalg.blas.dgemm(1.0, a, a), a @ a)
        assert np.allclose(numba.njit(lambda x: np.dot(x, x))(a), a @ a)
        print("ok")
    """)
    assert out.split() == ["ok"]


@pytest.mark.parametrize("first", ["scipy.linalg", "no extension file"])
def test_scipys_blas_module_the_usual_way_where_it_cannot_be_loaded_alone(first):
    # scipy.linalg already imported: its module as it is, no import hook;
    # no extension file where expected: the usual import
    out = _run(f"""
        import os, sys
        if {first!r} == "scipy.linalg":
            import scipy.linalg
        else:
            isfile = os.path.isfile
            os.path.isfile = lambda p: False if "cython_blas" in str(p) else isfile(p)
        hooks = len(sys.meta_path)
        import fastgrad
        from fastgrad.kernels import gemm_library
        import scipy.linalg.cython_blas
        assert gemm_library.scipy_cython_blas() is scipy.linalg.cython_blas
        assert len(sys.meta_path) == hooks
        assert "scipy.linalg" in sys.modules
        print("ok")
    """)
    assert out.split() == ["ok"]


def test_scipy_linalg_served_by_another_finder_gets_the_module_too():
    # a SciPy whose packages another meta-path finder serves (an editable
    # build): the binding asks the finders after it, not the path finder
    out = _run("""
        import importlib.abc, importlib.machinery, sys
        path_finder = importlib.machinery.PathFinder.find_spec

        class Editable(importlib.abc.MetaPathFinder):
            served = []

            def find_spec(self, fullname, path=None, target=None):
                if fullname != "scipy.linalg":
                    return None
                self.served.append(fullname)
                return path_finder(fullname, path, target)

        sys.meta_path.insert(0, Editable())
        importlib.machinery.PathFinder.find_spec = classmethod(
            lambda cls, fullname, path=None, target=None:
            None if fullname == "scipy.linalg" else path_finder(fullname, path, target))
        import fastgrad
        loaded = sys.modules["scipy.linalg.cython_blas"]
        import scipy.linalg
        assert Editable.served == ["scipy.linalg"]
        assert scipy.linalg.cython_blas is loaded
        print("ok")
    """)
    assert out.split() == ["ok"]

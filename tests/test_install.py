"""Packaging: ``kernels/`` ships as ``fastgrad.kernels`` (no top-level
``kernels`` module in site-packages) and the CUDA sources ship in the wheel."""
import os
import pathlib
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import fastgrad
import fastgrad.kernels
import fastgrad.kernels.cpu.dense

REPO = pathlib.Path(__file__).resolve().parents[1]


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_kernels_is_a_subpackage():
    assert fastgrad.kernels.__name__ == "fastgrad.kernels"
    assert fastgrad.kernels.cpu.dense.__name__ == "fastgrad.kernels.cpu.dense"
    from fastgrad import device
    assert device.kernels("cpu") is sys.modules["fastgrad.kernels.cpu"]


_DIST_CHECK = """
import importlib.metadata as md, json, pathlib, sys
import fastgrad, fastgrad.kernels
dist = md.distribution("fastgrad")
kfile = pathlib.Path(fastgrad.kernels.__file__).resolve()
direct = dist.read_text("direct_url.json")
info = json.loads(direct) if direct else {}
if info.get("dir_info", {}).get("editable"):
    # editable install: the package maps into the project it was installed from
    root = pathlib.Path(info["url"].removeprefix("file://")).resolve()
    assert kfile.is_relative_to(root), (kfile, root)
    assert pathlib.Path(fastgrad.__file__).resolve().is_relative_to(root)
    kind = "editable"
else:
    files = {pathlib.Path(dist.locate_file(f)).resolve() for f in dist.files or ()}
    assert kfile in files, f"{kfile} is not one of the fastgrad distribution's files"
    assert not any(str(f).startswith("kernels/") for f in dist.files), "top-level kernels/ installed"
    kind = "wheel"
assert (dist.read_text("top_level.txt") or "fastgrad").split() == ["fastgrad"]
print(kind)
"""


def test_kernels_file_belongs_to_the_fastgrad_distribution(tmp_path):
    # from a temp dir: run from the repo root, importlib.metadata would find
    # the source tree's fastgrad.egg-info instead of the installed dist-info
    out = subprocess.run([sys.executable, "-c", _DIST_CHECK], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("editable", "wheel")


def test_no_top_level_kernels_module(tmp_path):
    code = ("import importlib.util, sys, fastgrad, fastgrad.kernels.cpu;"
            "print(importlib.util.find_spec('kernels'), 'kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"], out.stdout + out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree, with a probe .cu/.cuh added
    to kernels/cuda so that shipping CUDA sources is checked before they exist."""
    if not (REPO / "pyproject.toml").exists():
        pytest.skip("not running from a source checkout")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", "*.nbi", "*.nbc")
    for name in ("fastgrad", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "setup.py"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    (src / "kernels" / "cuda" / "fg_probe.cu").write_text("// probe\n")
    (src / "kernels" / "cuda" / "fg_probe.cuh").write_text("// probe\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp / "dist")],
                         cwd=src, env=_clean_env(), capture_output=True, text=True)
    if out.returncode:
        pytest.fail(f"building the wheel failed:\n{out.stdout}\n{out.stderr}")
    (whl,) = (tmp / "dist").glob("fastgrad-*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist(), time.perf_counter() - t0, whl


def test_wheel_layout(wheel):
    names, _, _ = wheel
    for required in ("fastgrad/__init__.py", "fastgrad/ops.py", "fastgrad/kernels/__init__.py",
                     "fastgrad/kernels/cpu/__init__.py", "fastgrad/kernels/cpu/dense.py",
                     "fastgrad/kernels/cpu/mathfn.py", "fastgrad/kernels/cuda/__init__.py",
                     "fastgrad/torch/__init__.py", "fastgrad/torch/optim.py",
                     "fastgrad/kernels/cpu/multi_tensor.py"):
        assert required in names, f"{required} missing from the wheel"
    tops = {n.split("/")[0] for n in names}
    assert not any(n.startswith("kernels/") for n in names), "top-level kernels/ in the wheel"
    assert tops <= {"fastgrad"} | {t for t in tops if t.endswith(".dist-info")}, tops
    assert not any(n.startswith("tests/") or n.startswith("bench/") for n in names)


def test_wheel_ships_cuda_sources(wheel):
    names, _, _ = wheel
    assert "fastgrad/kernels/cuda/fg_probe.cu" in names
    assert "fastgrad/kernels/cuda/fg_probe.cuh" in names
    for cu in sorted((REPO / "kernels" / "cuda").glob("*.cu*")):
        assert f"fastgrad/kernels/cuda/{cu.name}" in names


def test_regular_install_from_the_wheel_trains(wheel, tmp_path):
    """A regular (non-editable) install: the wheel unpacked into its own
    site directory, imported from there (not from this checkout), trains."""
    _, _, whl = wheel
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                          "--target", str(site), str(whl)], env=_clean_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    code = (
        "import numpy as np, fastgrad as fg, fastgrad.kernels.cpu.dense as d\n"
        "m = fg.MLP([3, 4, 2], dtype='float64')\n"
        "s = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m))\n"
        "print(fg.__file__); print(d.__file__); print(s(np.ones((2, 3)), [0, 1]))\n")
    env = dict(_clean_env(), PYTHONPATH=str(site), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pkg, dense, loss = out.stdout.split()
    assert pkg.startswith(str(site)) and dense.startswith(str(site / "fastgrad" / "kernels"))
    assert np.isfinite(float(loss))


def test_torch_features_name_the_extra_without_torch():
    """fastgrad.torch and the interop need PyTorch: without it they say
    which extra brings it (the project's pinned torch), not a bare
    ModuleNotFoundError or 'pip install torch'."""
    from conftest import run_without
    out = run_without(["torch"], "import fastgrad as fg\n"
                      "for call in (lambda: __import__('fastgrad.torch'),\n"
                      "             lambda: fg.interop.to_torch(fg.MLP([2, 3])),):\n"
                      "    try:\n        call()\n"
                      "    except ImportError as exc:\n        print(exc)\n")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr
    assert all("pip install 'fastgrad[peers]'" in line for line in lines), lines

"""Device selection: names, FASTGRAD_DEVICE, reasons when CUDA cannot run."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import device as fg_device


@pytest.fixture(autouse=True)
def _restore_device(monkeypatch):
    """Each test starts with no device chosen and leaves none behind."""
    monkeypatch.setattr(fg_device, "_current", None)
    monkeypatch.delenv("FASTGRAD_DEVICE", raising=False)
    yield


def test_available_devices():
    devs = fg.available_devices()
    assert devs[0] == "cpu" and set(devs) <= {"cpu", "cuda"}
    assert fg.get_device() in devs


def test_set_and_get_cpu():
    assert fg.set_device("cpu") == "cpu"
    assert fg.get_device() == "cpu"
    assert fg.set_device("CPU") == "cpu"
    model = fg.MLP([3, 2])
    assert model.device == "cpu"
    assert isinstance(model.params, np.ndarray) and isinstance(model.grads, np.ndarray)


def test_auto_picks_an_available_device():
    dev = fg.set_device("auto")
    assert dev in fg.available_devices()
    assert dev == ("cuda" if "cuda" in fg.available_devices() else "cpu")


def test_env_variable(monkeypatch):
    monkeypatch.setenv("FASTGRAD_DEVICE", "cpu")
    assert fg.get_device() == "cpu"
    monkeypatch.setattr(fg_device, "_current", None)
    monkeypatch.setenv("FASTGRAD_DEVICE", "tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        fg.get_device()
    monkeypatch.setattr(fg_device, "_current", None)
    monkeypatch.setenv("FASTGRAD_DEVICE", "")
    assert fg.get_device() in fg.available_devices()


@pytest.mark.parametrize("name", ["gpu", "cuda0", "", "cuda:0", 1])
def test_unknown_device_value_error(name):
    with pytest.raises(ValueError, match="unknown device .*expected 'auto', 'cpu' or 'cuda'"):
        fg.set_device(name)


def test_cuda_unavailable_here_says_why():
    reason = fg_device._cuda_problem()
    if reason is None:
        pytest.skip("CUDA can run here")
    with pytest.raises(fg.DeviceUnavailableError, match="device 'cuda' is unavailable: .+") as err:
        fg.set_device("cuda")
    assert reason in str(err.value)
    with pytest.raises(fg.DeviceUnavailableError):
        fg.MLP([3, 2], device="cuda")
    assert "cuda" not in fg.available_devices()
    assert fg.set_device("auto") == "cpu"


@pytest.mark.parametrize("fake,reason", [
    (None, "CuPy is not installed"),
    ("raise", "no usable NVIDIA driver: boom"),
    (0, "no NVIDIA GPU is visible"),
])
def test_cuda_reasons_are_concrete(monkeypatch, fake, reason):
    """Simulated: no CuPy, no driver, no GPU -> DeviceUnavailableError naming the cause."""
    if fake is None:
        monkeypatch.setitem(sys.modules, "cupy", None)        # import cupy -> ImportError
    else:
        def count():
            if fake == "raise":
                raise RuntimeError("boom")
            return fake
        cupy = types.ModuleType("cupy")
        cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
        monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert fg.available_devices() == ["cpu"]
    with pytest.raises(fg.DeviceUnavailableError, match=reason):
        fg.set_device("cuda")
    assert fg.set_device("auto") == "cpu"
    assert issubclass(fg.DeviceUnavailableError, RuntimeError)


def test_array_module_and_kernels_cpu():
    import fastgrad.kernels.cpu as kcpu
    assert fg_device.array_module("cpu") is np
    assert fg_device.kernels("cpu") is kcpu
    assert fg_device.device_of(np.zeros(3)) == "cpu"
    assert fg_device.device_of([1.0, 2.0]) == "cpu"


def test_kernel_twins_share_names():
    """ops dispatches by name: every CPU kernel ops calls exists in kernels.cpu."""
    import fastgrad.kernels.cpu as kcpu
    for name in ("dense_forward", "dense_backward", "activation_forward", "activation_backward",
                 "softmax_cross_entropy", "mse", "bce_with_logits"):
        assert callable(getattr(kcpu, name)), name


@pytest.mark.cuda
def test_cuda_model_lives_on_gpu():
    import cupy
    fg.set_device("cuda")
    model = fg.MLP([3, 2])
    assert model.device == "cuda" and isinstance(model.params, cupy.ndarray)
    assert fg_device.device_of(model.params) == "cuda"


def test_import_does_not_import_cupy():
    code = "import sys, fastgrad; fastgrad.MLP([3, 2], device='cpu'); print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"FASTGRAD_DEVICE": "cpu", "PATH": ""})
    assert out.stdout.strip() == "False"


def test_no_driver_is_found_without_importing_cupy():
    """Where the CUDA driver's library does not load, the "auto" device
    resolves without importing CuPy (about a second of a cold start)."""
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("a CUDA driver library loads here")
    except OSError:
        pass
    code = ("import sys, fastgrad as fg; dev = fg.set_device('auto'); "
            "print(dev, 'cupy' in sys.modules, fg.device._cuda_problem())")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTGRAD_DEVICE", "EMU_CUPY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split(" ", 2)
    assert out[:2] == ["cpu", "False"]
    assert out[2].startswith("no usable NVIDIA driver: ")

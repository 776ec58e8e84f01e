"""pytest plugin: run fastgrad's CUDA tests on the host emulator.

    PYTHONPATH=tools/cuda_emulator python -m pytest -p conftest_plugin -m cuda tests

Installs the emulated ``cupy`` (fakecupy.py) and kernels (emu.py), and lifts
the "no CUDA here" skips the test suite's conftest adds.  Subprocesses
started by the tests get the emulator too (sitecustomize.py, EMU_CUPY=1).
"""
import os
import sys

import pytest

import emu

os.environ["EMU_CUPY"] = "1"
if "cupy" not in sys.modules:
    emu.install()


def pytest_report_header(config):
    return ["CUDA EMULATOR on the host: kernels compiled with g++, CuPy emulated by NumPy"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.own_markers = [m for m in item.own_markers if m.name != "skip"]


def pytest_sessionfinish(session, exitstatus):
    print(f"\nemulated launches: {emu.stats['launches']}")

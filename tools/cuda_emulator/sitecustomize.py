# Child processes started with PYTHONPATH=tools/cuda_emulator and EMU_CUPY=1 get the
# emulated cupy LAZILY: a finder supplies it on the first "import cupy" (so a
# child that sets sys.modules["cupy"] = None, or never imports cupy, is unaffected).
import os
import sys

if os.environ.get("EMU_CUPY") == "1":
    import importlib.abc
    import importlib.util

    class _EmuCupy(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "cupy":
                return importlib.util.spec_from_loader(name, self)
            return None

        def create_module(self, spec):
            import emu
            return emu.make_cupy()

        def exec_module(self, module):
            import fakecupy
            sys.modules.update(fakecupy.submodules(module))

    sys.meta_path.insert(0, _EmuCupy())

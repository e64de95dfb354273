"""sd3exp CPU shim, loaded at start-up when this folder is on PYTHONPATH.

SimpleTuner 4.10.1 (helpers/training/collate.py) calls tensor.pin_memory()
unconditionally, which fails without an NVIDIA driver. Once torch has been
imported (never earlier), and only if torch.cuda.is_available() is false,
torch.Tensor.pin_memory returns the tensor itself. Any other sitecustomize
further along sys.path still runs: Python imports only the first one.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _patch(torch) -> None:
    if torch.cuda.is_available():
        return
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    print("sd3exp cpu_shim: no CUDA device, torch.Tensor.pin_memory returns the tensor unchanged", file=sys.stderr)


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_patch(module):
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = exec_then_patch
        return spec


def _chain() -> None:
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


sys.meta_path.insert(0, _AfterTorchImport())
_chain()

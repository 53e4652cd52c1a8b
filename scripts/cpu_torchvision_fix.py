"""CPU-only fix-up, installed into the venv's site-packages by scripts/setup_cpu_env.sh.

PyPI's torchvision is linked against CUDA torch; next to torch's CPU build its native library
fails to load and `import torchvision` dies with "operator torchvision::nms does not exist".
Qwen-VL processors only use torchvision's Python transforms, so declaring the two operator
schemas torchvision registers fake kernels for is enough. The hook runs lazily, just before the
first `import torchvision` in any process (pytest, DVC stages, vLLM workers), and only when the
native library really fails to load.
"""

import importlib.abc
import importlib.util
import sys

_library = None  # keeps the schema definitions alive for the process


def _define_missing_schemas() -> None:
    global _library
    import glob
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return  # the native library works: nothing to fix
        except (OSError, RuntimeError):
            pass
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_missing_schemas()
        return None  # the regular finders import the module


sys.meta_path.insert(0, _BeforeTorchvision())

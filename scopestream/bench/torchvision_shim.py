"""A stand-in for ``torchvision`` in the CAREamics benchmark environment only.

CAREamics pins a torchvision whose only wheel on PyPI is built for CUDA torch; next to
the CPU torch of these machines its operators fail to load. CAREamics' N2V and N2V2 never
call torchvision (only its LVAE models and torchmetrics' image metrics do), so the
benchmark environment gets this package instead: every import succeeds and any use
raises. Installed as ``torchvision/__init__.py`` by ``scopestream bench quality``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.0+scopestream-shim"


def _attr(owner: str, name: str) -> _Missing:
    if name.startswith("__"):  # what importers and inspect probe for: absent, as usual
        raise AttributeError(name)
    return _Missing(f"{owner}.{name}")


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name}: torchvision is not installed in this environment")

    def __getattr__(self, name: str) -> _Missing:
        return _attr(self._name, name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = lambda n, _s=spec.name: _attr(_s, n)  # type: ignore[method-assign,misc]
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        return None


sys.meta_path.insert(0, _Finder())


def __getattr__(name: str) -> _Missing:
    return _attr("torchvision", name)

"""`batchmon run`'s auto-attach: this folder goes first on the child's PYTHONPATH, so every Python process the
command starts runs our sitecustomize.py (which chains to any other sitecustomize on the path).

With BATCHMON_AUTO=1 it installs a one-shot import hook for ``torch``: processes that never import torch pay
nothing and never load it; in those that do, the agent attaches right after ``import torch`` completes
(batchmon.agent._auto_attach: discovery hooks only, the socket opens at the model's first forward).

Keep this folder to these two files: every module here is importable by its bare name in the child.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, Sequence

FOLDER = os.path.dirname(os.path.abspath(__file__))
ENV_FLAG = "BATCHMON_AUTO"


class _LoaderProxy:
    """Wraps torch's loader: runs it unchanged, then attaches the agent. Everything else is delegated."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:  # leave no trace of us on torch itself
            module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None:
                spec.loader = self._loader
        _attach_after_torch_import()


class TorchImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``torch`` is about to be imported it wraps torch's own loader once."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> Any:
        if fullname != "torch":
            return None
        uninstall()
        try:
            spec = importlib.util.find_spec("torch")
        except (ImportError, ValueError):
            return None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderProxy(spec.loader)  # type: ignore[assignment]  # a Loader by duck typing
        return spec


_hook: TorchImportHook | None = None


def install() -> None:
    """Attach when torch gets imported (or now, if it already is)."""
    global _hook
    if "torch" in sys.modules:
        _attach_after_torch_import()
        return
    if _hook is None:
        _hook = TorchImportHook()
        sys.meta_path.insert(0, _hook)


def uninstall() -> None:
    global _hook
    hook, _hook = _hook, None
    if hook is not None:
        try:
            sys.meta_path.remove(hook)
        except ValueError:
            pass


def _attach_after_torch_import() -> None:
    try:
        from batchmon.agent.handle import _auto_attach

        _auto_attach()
    except Exception as exc:  # noqa: BLE001 - never break the user's `import torch`
        sys.stderr.write(f"batchmon: agent not attached: {type(exc).__name__}: {exc}\n")

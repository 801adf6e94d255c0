"""batchmon run: attach the agent to this Python process when it imports torch (see batchmon.agent.bootstrap).

Python imports the first ``sitecustomize`` on sys.path; ``batchmon run`` puts this folder first, so after
installing the hook we run the sitecustomize that would otherwise have been imported.
"""

import os
import sys


def _install() -> None:
    if os.environ.get("BATCHMON_AUTO") != "1":
        return
    try:
        from batchmon.agent.bootstrap import install
    except Exception as exc:  # noqa: BLE001 - e.g. a Python without batchmon installed
        sys.stderr.write(f"batchmon: agent not attached in {sys.executable}: {type(exc).__name__}: {exc}\n")
        return
    install()


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


try:
    _install()
finally:
    _chain()

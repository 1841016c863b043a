"""Triton kernels, installed as `nlsr_fast.kernels` (setup.py). Imported lazily by the op adapters: triton is optional.

This folder sits at the repository root, which `python -c`, `python -m` and pytest put on `sys.path` when started
there. Found first under the top-level name `kernels`, it would shadow Hugging Face's `kernels` package, which
transformers imports. So when this file runs as `kernels`, it loads the installed `kernels` in its place (or raises
ModuleNotFoundError when none is installed): the repository's kernels are never importable as `kernels`.
Tested in tests/test_no_shadowing.py.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.realpath(__file__))
    # Every sys.path entry but the folder holding this one (compared resolved: a symlinked spelling of the
    # repository root would otherwise find this file again, and load it again, without end).
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.dirname(_here)]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named 'kernels' ({_here} is nlsr_fast.kernels, not a top-level package)",
                                  name="kernels")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed  # the import statement returns what sys.modules holds when this file ends
    _spec.loader.exec_module(_installed)

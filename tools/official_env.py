"""Import helpers for running the *official* OpenMMLab-based code on a CPU-only machine.

Used by ``tools/make_parity_fixtures.py`` only (never by segcli, never in CI).

Two problems are solved here, without touching any installed package:

* ``mmcv`` installed without compiled extensions (``MMCV_WITH_OPS=0`` for mmcv 1.x,
  ``mmcv-lite`` for 2.x) cannot import ``mmcv.ops``; MMSegmentation's ``models`` package imports
  a few heads that pull such ops in at import time (point_head, psa_head, ...). We register a
  stand-in ``mmcv.ops`` whose attributes are placeholder classes that raise when *instantiated*.
  None of the models built for the fixtures instantiates a compiled op, so if one ever did, the
  run would fail loudly instead of silently computing something else.
* ``mmsegmentation==0.24.1`` asserts ``mmcv<=1.6.0`` in its package ``__init__``; with the
  pure-Python mmcv 1.7.2 we register the ``mmseg`` package object ourselves (same path, same
  ``__version__``) so the assertion is skipped. Every submodule is the real, unmodified file.

Repositories without ``__init__.py`` files (zbwxp/SegVit) are imported as a synthetic package so
that their relative imports (``from .atm_single_head import ...``) resolve.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path


class _MissingOp:
    """Placeholder for a compiled mmcv op: importing works, building one raises."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__}: compiled mmcv ops are not available in this environment")


class _OpsModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_MissingOp,), {})
        setattr(self, name, placeholder)
        return placeholder


class _OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``mmcv.ops`` and any ``mmcv.ops.*`` submodule as an :class:`_OpsModule`."""

    prefix = "mmcv.ops"

    def find_spec(self, fullname, path, target=None):
        if fullname == self.prefix or fullname.startswith(self.prefix + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _OpsModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        return None


def install_mmcv_ops_stub() -> bool:
    """Register the stand-in ``mmcv.ops`` if the real one cannot be imported. Returns True if stubbed."""
    try:
        importlib.import_module("mmcv.ops")
        return False
    except Exception:
        for name in [n for n in sys.modules if n == "mmcv.ops" or n.startswith("mmcv.ops.")]:
            del sys.modules[name]
        if not any(isinstance(f, _OpsFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _OpsFinder())
        return True


def register_package(name: str, directory: str | Path, version: str | None = None) -> types.ModuleType:
    """Make ``name`` an importable package rooted at ``directory`` without running its ``__init__``."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(directory)]
    module.__file__ = str(Path(directory) / "__init__.py")
    if version is not None:
        module.__version__ = version
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def import_mmseg():
    """Import ``mmseg`` (0.x or 1.x) and ``mmseg.models`` on a CPU-only, ops-less mmcv."""
    install_mmcv_ops_stub()
    spec = importlib.util.find_spec("mmseg")
    if spec is None:
        raise ImportError("mmsegmentation is not installed")
    location = Path(list(spec.submodule_search_locations)[0])
    version_file = location / "version.py"
    version_ns: dict = {}
    exec(compile(version_file.read_text(), str(version_file), "exec"), version_ns)
    version = version_ns["__version__"]
    if version.startswith("0."):
        # 0.x: skip only the mmcv-version assertion of mmseg/__init__.py
        register_package("mmseg", location, version)
    import mmseg  # noqa: F401  (1.x: the real __init__, its check accepts mmcv-lite 2.0.x)
    importlib.import_module("mmseg.models")
    return sys.modules["mmseg"], version


def import_repo_as_package(package: str, repo: str | Path, subpackages: list[str], modules: list[str]):
    """Import ``modules`` (dotted, relative to ``repo``) of a repository that has no ``__init__.py``."""
    repo = Path(repo)
    register_package(package, repo)
    for sub in subpackages:
        register_package(f"{package}.{sub}", repo / sub.replace(".", "/"))
    return [importlib.import_module(f"{package}.{m}") for m in modules]

"""segcli: effective and efficient semantic segmentation (NRD, SegViT, Shrunk, SegViT-CL, DToP).

The importable API lives in :mod:`segcli.api`; its main entry points are re-exported here
lazily so that ``import segcli`` stays cheap.
"""
from .version import __version__

_API = ("build_model", "load_checkpoint", "train", "evaluate", "predict", "flops", "load_recipe", "convert", "Segmenter")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = list(_API) + ["__version__"]

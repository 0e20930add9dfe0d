"""Reading checkpoints made elsewhere without running their code.

A checkpoint from the official repos or MMSegmentation is a pickle written by someone else. It is
read with ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain
containers. MMEngine checkpoints also hold objects of MMEngine's own classes (``message_hub``'s
history buffers) and numpy values, which ``weights_only`` refuses. For those, each refused
global is replaced by an inert stand-in class of the same dotted name, defined here and holding
whatever state the pickle gives it, and the file is read again, still with ``weights_only=True``:
no module of the checkpoint's is imported and no function of it is called. The stand-ins are
only granted to names from the namespaces such files are known to use (MMEngine, MMCV,
MMSegmentation, numpy, the official repos' ``mmseg_custom``); any other global (``os.system``,
``builtins.eval``, ...) is a pickle that would run code, and is refused.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import SegcliError

# dotted-name prefixes whose objects may appear in a training checkpoint beside its tensors
STUBBED_NAMESPACES = ("mmengine.", "mmcv.", "mmseg.", "mmseg_custom.", "numpy.", "_codecs.encode", "argparse.Namespace")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
MAX_STUBS = 64


class Opaque:
    """An inert stand-in for an object of a class that is not imported: keeps its pickled state."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {type(self).__module__}.{type(self).__qualname__}>"


def _stand_in(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return type(name, (Opaque,), {"__module__": module, "__qualname__": name})


def read_foreign_checkpoint(path: str | Path) -> object:
    """The unpickled content of a checkpoint file from another codebase (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SegcliError("checkpoint not found", str(path), "check the path")
    stand_ins: list[type] = []
    for _ in range(MAX_STUBS + 1):
        try:
            with torch.serialization.safe_globals(stand_ins), warnings.catch_warnings():
                # torch notes any pickle protocol above 2 ("might not support all instructions"); an
                # instruction it cannot read fails below as an UnpicklingError, which is reported, so
                # the note is nothing a user can act on (plain pickles are protocol 4 by default)
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            match = _GLOBAL.search(str(err))
            if match is None:
                raise SegcliError("refused to read it: not a pickle of weights", str(path),
                                  "give a checkpoint of model weights") from None
            name = match.group(1)
            if "blocked" in str(err) or not name.startswith(STUBBED_NAMESPACES) or any(s.__module__ + "." + s.__qualname__ == name
                                                              for s in stand_ins):
                raise SegcliError(f"refused to read it: the pickle asks for {name}, which would run code", str(path),
                                  "only weight files are read; re-save the state_dict with torch.save") from None
            stand_ins.append(_stand_in(name))
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise SegcliError(f"not a readable checkpoint ({err.__class__.__name__}: {str(err).splitlines()[0][:120]})",
                              str(path), "the file may be truncated; download it again") from None
    raise SegcliError(f"refused to read it: more than {MAX_STUBS} unknown classes", str(path))


def state_dict_of(payload: object, source: str) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint payload: ``state_dict`` / ``model`` / the payload itself."""
    state = payload
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegcliError("no state dict of tensors in it", source, "give a checkpoint of model weights")
    return dict(state)

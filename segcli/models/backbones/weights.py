"""Reading local weight files (no network, ``weights_only=True``)."""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import SegcliError


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from .pth/.pt/.bin (optionally nested under model/state_dict) or .safetensors."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file
        raise SegcliError(f"cannot read weights: {err.__class__.__name__}: {str(err).splitlines()[0][:200]}", str(path),
                          "give a PyTorch state dict or a .safetensors file") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegcliError("not a state dict of tensors", str(path), "give a PyTorch state dict")
    return state

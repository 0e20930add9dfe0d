"""Finding and reading backbone weight files (``weights_only=True``).

``model.backbone.pretrained`` is a local file, ``timm:NAME`` (timm's pretrained weights, from the
model hub's cache) or an ``http(s)`` URL (segcli's cache): :func:`resolve_weights` turns each into
a local file, downloading it once (``segcli/download.py``) and reading it offline afterwards.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ... import download
from ...errors import SegcliError

LOCAL_HINT = "give a local file (.pth/.pt/.bin/.safetensors/.npz), timm:NAME or an http(s) URL"


def resolve_weights(ref: str, progress: download.Progress | None = None) -> Path:
    """The local file a ``model.backbone.pretrained`` value names; ``timm:`` names and URLs are
    downloaded on first use (``progress`` gets the transfer), a path must exist."""
    if ref.startswith("timm:"):
        return download.timm_weights(ref[len("timm:"):], progress)
    if download.is_url(ref):
        return download.fetch_url(ref, progress=progress)
    file = Path(ref).expanduser()
    if not file.is_file():
        raise SegcliError(f"pretrained weights not found: {file}", download.PRETRAINED_KEY, LOCAL_HINT)
    return file


def cached_weights(ref: str) -> Path | None:
    """The local file of ``ref`` if it is on this machine now (never downloads), else None."""
    if ref.startswith("timm:"):
        return download.cached_timm_weights(ref[len("timm:"):])
    if download.is_url(ref):
        path = download.url_cache_path(ref)
        return path if path.is_file() else None
    file = Path(ref).expanduser()
    return file if file.is_file() else None


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


MMSEG_VIT_RENAMES = (  # MMSegmentation VisionTransformer -> timm VisionTransformer key names
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layers\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"layers\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"layers\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"ln1\.(weight|bias)", r"norm.\1"),  # the final norm
    (r"(pos_embed|cls_token)", r"\1"),
    # BEiT (MMSegmentation's beit2mmseg.py format): the rest of a layer keeps timm's names
    # (attn.qkv, q_bias, v_bias, relative_position_bias_table, gamma_1, gamma_2)
    (r"layers\.(\d+)\.(attn\.(?:qkv|proj|q_bias|v_bias|relative_position_\w+)(?:\.\w+)?|gamma_[12])",
     r"blocks.\1.\2"),
)


def mmseg_vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MMSegmentation-format ViT or BEiT state dict (``tools/model_converters/vit2mmseg.py``,
    ``beit2mmseg.py``) in timm's names.

    The fused ``in_proj`` of MMSegmentation's attention is timm's ``qkv`` as is (q, k, v stacked
    in that order in both). Keys that match no rule keep their name (and then fail to load).
    """
    out = {}
    for key, value in state.items():
        for pattern, target in MMSEG_VIT_RENAMES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, target, key)
                break
        out[key] = value
    return out

"""An exported .onnx file as a loaded model, beside :func:`segcli.build.load_checkpoint`.

``segcli predict`` and ``segcli benchmark`` take a .onnx file where they take a checkpoint: this
opens it on onnxruntime (:class:`~segcli.engine.deploy.OnnxSegmentor`) and rebuilds the
:class:`~segcli.build.LoadedModel` around it from the recipe and class metadata the file carries.
It lives at the build layer, not in the export workflow: reading a model file is what build
does, and the workflows that read one should not import the one that writes it.
"""
from __future__ import annotations

from pathlib import Path

from .build import LoadedModel
from .engine.deploy import OnnxSegmentor, ort_session, read_metadata
from .errors import SegcliError
from .recipe import recipe_from_dict


def load_onnx(path: str | Path) -> LoadedModel:
    """An exported .onnx file as a :class:`LoadedModel` (``model`` runs on onnxruntime), so that
    ``segcli predict`` uses it exactly like a checkpoint: recipe and class metadata from the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SegcliError("ONNX file not found", str(path), "export one with `segcli export CHECKPOINT`")
    session = ort_session(path)
    metadata = read_metadata(session, str(path))
    recipe = recipe_from_dict(metadata["recipe"], where=f"{path} (embedded recipe)")
    return LoadedModel(OnnxSegmentor(session, metadata, str(path)), recipe, metadata["meta"], path)


__all__ = ["load_onnx"]

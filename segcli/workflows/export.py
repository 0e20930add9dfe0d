"""Exporting a checkpoint to a deployable file, verified against PyTorch (``segcli export``).

One path for every format: the checkpoint's segmentor is wrapped in
:class:`~segcli.engine.deploy.DeployGraph` (0..255 RGB image in, labels or scores out), captured
once with ``torch.export`` (non-strict), and then

* ``onnx``: that ExportedProgram goes through PyTorch's dynamo ONNX exporter (onnxscript);
  class names, palette and the recipe go into ``metadata_props``; onnxruntime checks it;
* ``exported-program``: the ExportedProgram itself (``torch.export.save``, ``.pt2``);
* ``torchscript``: ``torch.jit.trace`` (static shapes only; deprecated by PyTorch, kept for old
  runtimes).

Decisions. What a model can be exported as is declared by the model (``export_support()``,
``models/exportable.py``, as SMP's ``_is_torch_exportable``) and read before anything is
captured: a model whose computation depends on the pixel values (DToP with p0 < 1, EQD:
data-dependent token sets) has no faithful static graph, and one whose code fixes a size (NRD)
no dynamic one; either is refused in one line naming the recipe key, with nothing written.
``--dynamic`` asks for dynamic batch, height and width and keeps those the capture allows
(``Dim.AUTO``); the result says which axes stayed dynamic. After writing, the file is run on a
fixed-seed random image (and, if dynamic, on a second size) and compared with the eager model;
above the tolerance (a declaration that promised too much) the file is kept as
``<name>.unverified`` and a SegcliError is raised.

Running an exported .onnx file (``predict``, ``benchmark``) is :mod:`segcli.onnx_model`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..build import LoadedModel, load_checkpoint
from ..engine.deploy import EXTRA_HINT, INPUT_NAME, META_PREFIX, DeployGraph, ort_session
from ..errors import SegcliError, did_you_mean
from ..models.exportable import ExportSupport
from ..outputs import check_outputs
from ..version import __version__

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
OUTPUTS = ("labels", "scores")
OPSETS = range(18, 24)  # the dynamo exporter emits 18+; onnxruntime 1.18+ runs up to 23
DEFAULT_OPSET = 18
LABEL_AGREEMENT = 0.999  # fraction of pixels whose label must match the eager model
SCORE_RTOL = 1e-4  # max |diff| relative to the largest |score| of the eager model
AXES = ("batch", "height", "width")


@dataclass
class Check:
    """One comparison of the exported file with the eager model on a sample input."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float | None  # None for labels (no scores to compare)
    rel_diff: float | None
    label_agreement: float
    error: str | None = None  # the runtime refused this input (a size the capture fixed)


@dataclass
class ExportResult:
    path: Path
    format: str
    output: str
    shape: tuple[int, int]
    batch: int
    dynamic_axes: list[str]  # the axes that stayed dynamic (empty: static)
    opset: int | None
    export_seconds: float
    checks: list[Check] = field(default_factory=list)
    verified: bool = True

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# --------------------------------------------------------------------------- validation


def _require_onnx_exporter() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SegcliError(f"ONNX export needs {', '.join(missing)}", "--format onnx", f"install the extra: {EXTRA_HINT}")


def check_options(fmt: str, output: str, shape, batch: int, opset: int | None, dynamic: bool) -> None:
    """The export options alone, before any checkpoint is read (or a named model fetched)."""
    if fmt not in FORMATS:
        raise SegcliError(f"unknown format '{fmt}'", "--format", did_you_mean(fmt, FORMATS))
    if output not in OUTPUTS:
        raise SegcliError(f"unknown output '{output}'", "--output", did_you_mean(output, OUTPUTS))
    if shape is not None and (len(shape) != 2 or min(shape) < 1):
        raise SegcliError(f"shape must be two positive sizes, got {list(shape)}", "--shape", "e.g. --shape 512 512")
    if batch < 1:
        raise SegcliError(f"batch must be at least 1, got {batch}", "--batch")
    if opset is not None and fmt != "onnx":
        raise SegcliError("an opset applies to ONNX only", "--opset", "drop it or use --format onnx")
    if opset is not None and opset not in OPSETS:
        raise SegcliError(f"opset {opset} is not supported", "--opset",
                          f"use {OPSETS.start}-{OPSETS.stop - 1} (the dynamo exporter emits opset 18 and later)")
    if dynamic and fmt == "torchscript":
        raise SegcliError("TorchScript tracing fixes every size", "--dynamic",
                          "use --format onnx or exported-program for dynamic shapes")


def default_out(checkpoint: Path, fmt: str) -> Path:
    """Beside the checkpoint: ``runs/x/best.pt`` -> ``runs/x/best.onnx`` (``.pt2``, ``.torchscript.pt``)."""
    return checkpoint.with_name(checkpoint.stem + FORMATS[fmt])


# --------------------------------------------------------------------------- capture


def check_support(support: ExportSupport, dynamic: bool) -> None:
    """Refuse, in one line, what the model declares it cannot be exported as."""
    if not support.graph:
        raise SegcliError(f"this model cannot be exported faithfully: {support.reason}", support.key, support.fix)
    if dynamic and not support.dynamic:
        raise SegcliError(f"this model cannot be exported with dynamic sizes: {support.reason}", support.key,
                          support.fix)


def capture(graph: DeployGraph, sample: torch.Tensor, dynamic: bool):
    """``torch.export`` of the deploy graph -> (ExportedProgram, the axes that stayed dynamic)."""
    from torch.export import Dim

    dynamic_shapes = None
    if dynamic:
        auto = Dim.AUTO(min=1)
        dynamic_shapes = ({0: auto, 2: auto, 3: auto},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(graph, (sample,), dynamic_shapes=dynamic_shapes, strict=False)
    placeholder = program.graph_module.graph.find_nodes(op="placeholder")[-1]
    shape = placeholder.meta["val"].shape  # [B, 3, H, W], SymInt where dynamic
    kept, upper = [], {}
    for name, size in zip(AXES, (shape[0], shape[2], shape[3])):
        if isinstance(size, int):
            continue
        kept.append(name)
        bound = program.range_constraints.get(size.node.expr)
        if bound is not None and str(bound.upper) not in ("int_oo", "oo"):  # a finite bound
            upper[name] = int(bound.upper)
    return program, kept, upper


def second_shape(shape: tuple[int, int, int, int], kept: list[str], upper: dict[str, int], div: int):
    """Another input size along every dynamic axis (within the capture's known bounds), not a
    multiple of the size divisor, so that the padding inside the graph is exercised too."""
    steps = {"batch": 1, "height": div + 3, "width": div + 5}
    sizes = dict(zip(AXES, (shape[0], shape[2], shape[3])))
    for axis in kept:
        sizes[axis] = min(sizes[axis] + steps[axis], upper.get(axis, 1 << 30))
    return sizes["batch"], 3, sizes["height"], sizes["width"]


def _metadata(loaded: LoadedModel, output: str, kept: list[str], shape, batch: int) -> dict[str, str]:
    values = {"format": "segcli", "version": __version__, "recipe": loaded.recipe.to_dict(), "meta": loaded.meta,
              "output": output, "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                                          "range": "0..255 RGB"},
              "dynamic": kept, "shape": list(shape), "batch": batch}
    return {META_PREFIX + key: json.dumps(value) for key, value in values.items()}


def _write(program, graph, sample, fmt: str, tmp: Path, opset: int, metadata: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                onnx_program = torch.onnx.export(program, opset_version=opset, dynamo=True, verbose=False)
            onnx_program.model.metadata_props.update(metadata)
            onnx_program.save(str(tmp), external_data=False)
        elif fmt == "exported-program":
            torch.export.save(program, str(tmp), extra_files={"segcli.json": json.dumps(metadata)})
        else:
            traced = torch.jit.trace(graph, sample, check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={"segcli.json": json.dumps(metadata)})


# --------------------------------------------------------------------------- verification


def _runner(fmt: str, path: Path):
    if fmt == "onnx":
        session = ort_session(path)
        return lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(str(path)).module() if fmt == "exported-program" else torch.jit.load(str(path))
    return lambda x: module(x)


def compare(expected: torch.Tensor, got: torch.Tensor, output: str) -> Check:
    if output == "labels":
        return Check(tuple(expected.shape), None, None, float((expected == got).double().mean()))
    diff = float((expected - got).abs().max())
    scale = float(expected.abs().max())
    agreement = float((expected.argmax(1) == got.argmax(1)).double().mean())
    return Check(tuple(expected.shape), diff, diff / scale if scale > 0 else diff, agreement)


def passes(check: Check) -> bool:
    return check.label_agreement >= LABEL_AGREEMENT and (check.rel_diff is None or check.rel_diff <= SCORE_RTOL)


def sample_image(shape, generator: torch.Generator) -> torch.Tensor:
    """A fixed-seed image batch [B, 3, H, W], 0..255: smooth colour blobs plus noise, so that
    labels vary over the image as on a photo (uniform noise alone gives near-constant argmax)."""
    batch, _, height, width = shape
    coarse = torch.rand(batch, 3, max(1, height // 16), max(1, width // 16), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.rand(batch, 3, height, width, generator=generator)
    return (smooth * 0.8 + noise * 0.2) * 255


# --------------------------------------------------------------------------- the workflow


def export_model(checkpoint: str | Path, format: str = "onnx", shape: tuple[int, int] | None = None,
                 dynamic: bool = False, batch: int = 1, output: str = "labels", opset: int | None = None,
                 out: str | Path | None = None, overwrite: bool = False) -> ExportResult:
    """Export ``checkpoint`` (see the module docstring); returns the path and the checks it passed.

    ``shape`` (H, W) defaults to the recipe's crop size; it is the sample size of a dynamic export.
    """
    fmt = format
    check_options(fmt, output, shape, batch, opset, dynamic)
    checkpoint = Path(checkpoint)
    target = Path(out) if out is not None else default_out(checkpoint, fmt)
    check_outputs([target], inputs=[checkpoint], overwrite=overwrite, input_name="checkpoint")
    if not target.parent.is_dir():
        raise SegcliError("the output folder does not exist", str(target.parent), "create it first")
    if fmt == "onnx":
        _require_onnx_exporter()
    loaded = load_checkpoint(checkpoint, device="cpu")
    check_support(loaded.model.export_support(), dynamic)
    height, width = tuple(shape) if shape else tuple(loaded.recipe.data.crop_size)
    graph = DeployGraph(loaded.model, loaded.recipe.data.mean, loaded.recipe.data.std, output).eval()
    generator = torch.Generator().manual_seed(0)
    # a dynamic capture needs a batch of 2 at least: torch.export fixes axes of size 1
    example = sample_image((max(batch, 2) if dynamic else batch, 3, height, width), generator)
    opset = opset or DEFAULT_OPSET
    start = time.perf_counter()
    with torch.no_grad():
        program, kept, upper = capture(graph, example, dynamic)
        if dynamic and "batch" not in kept and len(example) != batch:  # the model fixes the batch: at --batch
            example = example[:batch]
            program, kept, upper = capture(graph, example, dynamic)
    if dynamic and not kept:
        raise SegcliError("no axis can be dynamic: the model fixes batch, height and width", "--dynamic",
                          "export without --dynamic, at the --shape and --batch you will run")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(program, graph, example, fmt, tmp, opset, _metadata(loaded, output, kept, (height, width), batch))
        seconds = time.perf_counter() - start
        result = ExportResult(target, fmt, output, (height, width), batch, kept, opset if fmt == "onnx" else None,
                              seconds)
        run = _runner(fmt, tmp)
        shapes = [(batch, 3, height, width)]
        if kept:
            shapes.append(second_shape(shapes[0], kept, upper, graph.size_divisor))
        for sample_shape in shapes:
            image = sample_image(sample_shape, generator)
            with torch.no_grad():
                expected = graph(image)
                try:
                    got = run(image)
                except Exception as err:  # a size the capture fixed (a guard the file does not check)
                    result.checks.append(Check(tuple(expected.shape), None, None, 0.0, str(err).splitlines()[0][:200]))
                    continue
            result.checks.append(compare(expected, got, output))
        result.verified = all(passes(check) for check in result.checks)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not result.verified:
        kept_as = target.with_name(target.name + ".unverified")
        os.replace(tmp, kept_as)
        worst = min(result.checks, key=lambda c: (c.label_agreement, -(c.rel_diff or 0)))
        if worst.error is not None:
            raise SegcliError(f"the exported graph does not run at input {list(worst.shape)} (the model fixed a size "
                              f"while it was captured: {worst.error}); kept as {kept_as}", "export",
                              "export with --shape of your images without --dynamic, or with another --shape "
                              "(ViTs: one other than the backbone's img_size)")
        raise SegcliError(f"the exported model disagrees with PyTorch (labels agree on {worst.label_agreement:.4%}"
                          + (f", max abs diff {worst.max_abs_diff:.3g}" if worst.max_abs_diff is not None else "")
                          + f" at input {list(worst.shape)}); kept as {kept_as}", "export",
                          "report it with the checkpoint's recipe; try another --opset or a static export")
    os.replace(tmp, target)
    return result


__all__ = ["ExportResult", "Check", "export_model", "default_out", "check_support"]

"""Speed, memory and cost of models on one input shape (``segcli benchmark``).

Each source is a recipe (random weights: ``pretrained`` cleared, nothing read from disk but the
recipe) or a segcli checkpoint (its weights). What is timed is what ``predict`` runs: the model
prepared for inference (:func:`~segcli.engine.inference.prepare_for_inference`), image -> labels
through the engine (:func:`~segcli.engine.inference.infer_labels`: the recipe's test crop/stride
in ``slide`` mode, no test-time resize or TTA), or with ``backbone_only`` the bare encoder. The
models are timed round-robin, one call of each in turn, so that load from other processes hits
all of them alike; the first call of each (the compile with ``compile``) is
reported apart and never counted.

Memory: one more call of each model after the timed ones (so that measuring never slows a timed
call): on CUDA the peak allocated during the call beyond what was allocated before it; on CPU the
growth of the resident set's high-water mark (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) after the C heap's free pages were handed back
(:func:`segcli.allocator.release_freed_memory`): the CLI keeps freed memory for reuse, which
would otherwise hide a peak inside memory already resident.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Literal

import torch

from ..allocator import release_freed_memory
from ..build import as_recipe, build_model, model_from_payload, pick_device, without_pretrained
from ..engine.checkpoint import is_checkpoint_file, read_checkpoint
from ..engine.evaluate import TestTimeModel
from ..engine.flops import count_flops, count_params
from ..engine.inference import compile_error, compile_for_inference, infer_labels, prepare_for_inference
from ..errors import SegcliError

METRICS = ("latency_median_s", "latency_min_s", "throughput_ips", "peak_memory_mib", "gflops", "params_m")


@dataclasses.dataclass
class _Entry:
    name: str
    kind: str  # "recipe" | "checkpoint" | "onnx"
    shape: tuple[int, int]
    run: Callable[[], object]
    gflops: float
    params_m: float
    times: list = dataclasses.field(default_factory=list)
    peak: float | None = None
    first_call_s: float = 0.0


def benchmark(sources: list[str | Path], shape: tuple[int, int] | None = None, batch: int = 1,
              threads: int | None = None, device: str | None = None, repeats: int = 5, warmup: int = 1,
              compile: bool = False, backbone_only: bool = False, mode: Literal["whole", "slide"] = "whole",
              overrides=(), progress: Callable[[int, int], None] | None = None) -> dict:
    """Latency (median, min), throughput, peak memory, GFLOPs and parameters of every source, with
    each metric's ratio to the first source's. Returns the dict ``segcli benchmark --json`` prints
    (schema in the README)."""
    _check(sources, shape, batch, threads, repeats, warmup, mode)
    dev = pick_device(device)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        entries = [_prepare(src, shape, batch, dev, compile, backbone_only, mode, overrides) for src in sources]
        total = len(entries) * (warmup + repeats + 1)  # + the memory call
        done = 0
        with torch.no_grad():
            for entry in entries:  # warm-up; the first call is timed apart (compilation with --compile)
                for i in range(warmup):
                    seconds = _timed(entry.run, dev, compile and i == 0, entry.name)
                    entry.first_call_s = seconds if i == 0 else entry.first_call_s
                    done += 1
                    if progress is not None:
                        progress(done, total)
            for _ in range(repeats):  # round-robin
                for entry in entries:
                    entry.times.append(_timed(entry.run, dev, False, entry.name))
                    done += 1
                    if progress is not None:
                        progress(done, total)
            for entry in entries:
                entry.peak = _peak_memory(entry.run, dev)
                done += 1
                if progress is not None:
                    progress(done, total)
        rows = [_row(entry, batch) for entry in entries]
    finally:
        torch.set_num_threads(old_threads)
    first = rows[0]
    for row in rows:
        row["ratio"] = {key: (row[key] / first[key] if row[key] is not None and first[key] else None) for key in METRICS}
    return {
        "device": str(dev), "threads": threads or old_threads, "batch": batch, "mode": mode, "repeats": repeats, "warmup": warmup, "compile": compile,
        "backbone_only": backbone_only, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "models": rows,
    }


def _check(sources, shape, batch, threads, repeats, warmup, mode) -> None:
    if not sources:
        raise SegcliError("no model given", "benchmark", "give one or more recipes or checkpoints")
    if shape is not None and (len(shape) != 2 or min(shape) < 1):
        raise SegcliError(f"shape {tuple(shape)} is not an image size", "--shape", "give H W >= 1, e.g. --shape 512 512")
    for value, name in ((batch, "--batch"), (repeats, "--repeats")):
        if value < 1:
            raise SegcliError(f"{name} must be >= 1, got {value}", name)
    if warmup < 1:
        raise SegcliError(f"--warmup must be >= 1, got {warmup} (the first call is never timed)", "--warmup")
    if threads is not None and threads < 1:
        raise SegcliError(f"--threads must be >= 1, got {threads}", "--threads")
    if mode not in ("whole", "slide"):
        raise SegcliError(f"unknown mode '{mode}'", "--mode", "use whole or slide")
    for source in sources:
        if not Path(source).expanduser().is_file():
            raise SegcliError(f"no such file: {source}", "benchmark", "give a recipe YAML or a segcli checkpoint")


def _prepare(source, shape, batch, dev, compile, backbone_only, mode, overrides) -> _Entry:
    if Path(source).suffix.lower() == ".onnx":
        return _prepare_onnx(source, shape, batch, dev, compile, backbone_only, mode)
    if is_checkpoint_file(source):
        model, recipe = model_from_payload(read_checkpoint(source), str(source), overrides=overrides)
        kind = "checkpoint"
    else:
        recipe = without_pretrained(as_recipe(source, overrides))
        model = build_model(recipe)
        kind = "recipe"
    model = model.to(dev).eval()
    height, width = shape or recipe.data.crop_size
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0)).to(dev)
    test = dataclasses.replace(recipe.test, mode=mode, scale=None, scales=(1.0,), flip=False)
    crop = tuple(recipe.data.crop_size)
    if backbone_only:
        encoder = model.backbone
        divisor = int(getattr(encoder, "size_divisor", 1) or 1)
        if height % divisor or width % divisor:
            raise SegcliError(f"--backbone-only needs a shape divisible by {divisor}, got {height}x{width}", "--shape")
        gflops, params = count_flops(encoder, images[:1]), count_params(encoder)
        prepare_for_inference(model)  # after counting: GFLOPs are of the model as built
        runner = compile_for_inference(model, dev).backbone if compile else encoder
        run = lambda: runner(images)  # noqa: E731
    else:
        gflops, params = count_flops(TestTimeModel(model, test, crop), images[:1]), count_params(model)
        prepare_for_inference(model)
        if compile:  # the modules' forwards; the engine's band-by-band label loop stays eager
            compile_for_inference(model, dev)
        run = lambda: infer_labels(model, images, test, crop)  # noqa: E731
    return _Entry(Path(source).stem, kind, (int(height), int(width)), run, gflops, params)


def _prepare_onnx(source, shape, batch, dev, compile, backbone_only, mode) -> _Entry:
    """An exported file run by onnxruntime (CPU), through the same label path as ``predict``.

    Decision: its GFLOPs and parameters are those of the PyTorch model of the recipe embedded in
    the file (the graph computes the same thing; fvcore cannot count an ONNX graph)."""
    from ..onnx_model import load_onnx

    if dev.type != "cpu":
        raise SegcliError("ONNX files are benchmarked with onnxruntime on the CPU", "--device", "use --device cpu")
    if compile or backbone_only:
        raise SegcliError("--compile and --backbone-only apply to PyTorch models, not to an ONNX file", str(source))
    loaded = load_onnx(source)
    recipe = loaded.recipe
    height, width = shape or tuple(loaded.model.shape) or recipe.data.crop_size
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    test = dataclasses.replace(recipe.test, mode=mode, scale=None, scales=(1.0,), flip=False)
    crop = tuple(recipe.data.crop_size)
    reference = build_model(without_pretrained(recipe), num_classes=loaded.meta["num_classes"]).eval()
    gflops, params = count_flops(TestTimeModel(reference, test, crop), images[:1]), count_params(reference)
    run = lambda: infer_labels(loaded.model, images, test, crop)  # noqa: E731
    return _Entry(Path(source).name, "onnx", (int(height), int(width)), run, gflops, params)


def _timed(fn, dev: torch.device, compiling: bool, name: str) -> float:
    """Wall seconds of one call of ``fn``."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    try:
        fn()
    except Exception as err:  # torch.compile's failures (no compiler, an unsupported op) surface on the first call
        if not compiling:
            raise
        raise compile_error(err, name) from None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def _peak_memory(fn, dev: torch.device) -> float | None:
    """Peak memory (MiB) of one call of ``fn`` beyond what was in use before it, or None."""
    before = _memory_before(dev)
    fn()
    return _memory_peak(dev, before)


def _memory_before(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        return _status_kib("VmRSS")
    except OSError:
        return None


def _memory_peak(dev: torch.device, before) -> float | None:
    if before is None:
        return None
    if dev.type == "cuda":
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    return max(0, _status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _row(entry: _Entry, batch: int) -> dict:
    median = statistics.median(entry.times)
    return {
        "name": entry.name, "source": entry.kind, "shape": list(entry.shape),
        "latency_median_s": median, "latency_min_s": min(entry.times), "throughput_ips": batch / median,
        "peak_memory_mib": entry.peak,
        "gflops": entry.gflops, "params_m": entry.params_m, "first_call_s": entry.first_call_s,
    }

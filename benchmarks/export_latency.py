"""ONNX export time and onnxruntime vs PyTorch eager CPU latency of a full-size recipe (random weights).

    python benchmarks/export_latency.py recipes/segvit_vit_b_ade20k.yaml --shape 512 512
    python benchmarks/export_latency.py recipes/nrd_r50_cityscapes.yaml --shape 1024 2048

One image, labels output, static shape, opset 18; the median of ``--runs`` timed runs after one
warm-up, both runtimes on ``--threads`` threads. Prints one line per figure.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from segcli.build import as_recipe, build_model, without_pretrained
from segcli.engine.deploy import INPUT_NAME, DeployGraph, ort_session
from segcli.workflows.export import DEFAULT_OPSET, _write, capture, sample_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402  (benchmarks/timing.py: (min, median) after one warm-up)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--shape", type=int, nargs=2, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = without_pretrained(as_recipe(args.recipe))
    torch.manual_seed(0)
    graph = DeployGraph(build_model(recipe).eval(), recipe.data.mean, recipe.data.std, "labels").eval()
    image = sample_image((1, 3, *args.shape), torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        start = time.perf_counter()
        with torch.no_grad():
            program, _, _ = capture(graph, image, dynamic=False)
        _write(program, graph, image, "onnx", path, DEFAULT_OPSET, {})
        export_s = time.perf_counter() - start
        session = ort_session(path, threads=args.threads)
        feed = {INPUT_NAME: image.numpy()}
        with torch.no_grad():
            eager_s = timed(lambda: graph(image), args.runs)[1]
            agree = float((torch.from_numpy(session.run(None, feed)[0]) == graph(image)).double().mean())
        ort_s = timed(lambda: session.run(None, feed), args.runs)[1]
        size_mb = path.stat().st_size / 2**20
    print(f"{args.recipe} {args.shape[0]}x{args.shape[1]}: export {export_s:.1f} s ({size_mb:.0f} MB), "
          f"PyTorch eager {eager_s:.2f} s, onnxruntime {ort_s:.2f} s ({eager_s / ort_s:.2f}x), "
          f"labels agree {agree:.4%} ({args.threads} threads, median of {args.runs})")


if __name__ == "__main__":
    main()

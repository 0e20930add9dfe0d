"""CPU latency of the NRD decoder vs the DeepLabV3+ decoder on the same encoder (thesis 3.3.1).

Thesis 3.3.1: batch 1, the same R50 + ASPP features of a 1024×2048 image, NRD decoder vs
DeepLabV3+ decoder. The encoder runs once; each decoder is then timed alone
(forward + scores at the input size), ``--repeats`` times after one warm-up, and the median
(and the minimum) is printed. Also compares NRD's two batched g_θ implementations (``impl: einsum | grouped_conv``),
as the whole decoder and as the dynamic per-patch MLP alone.

    python benchmarks/nrd_decoder_latency.py [--size 1024 2048] [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segcli.models.backbones.resnet import ResNetBackbone, ResNetConfig  # noqa: E402
from segcli.models.base import HeadContext  # noqa: E402
from segcli.models.heads.bilinear import BilinearConfig, BilinearHead  # noqa: E402
from segcli.models.heads.deeplabv3plus import DeepLabV3PlusConfig, DeepLabV3PlusHead  # noqa: E402
from segcli.models.heads.nrd import PATCH_MLP, NRDConfig, NRDHead, split_params  # noqa: E402
from timing import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--num-classes", type=int, default=19)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = ResNetBackbone(ResNetConfig(name=args.backbone, aspp=True)).eval()
    image = torch.randn(1, 3, *args.size)
    with torch.no_grad():
        start = time.perf_counter()
        features = encoder(image)  # [low-level [1, 256, H/4, W/4], F [1, 512, H/32, W/32]]
        encoder_s = time.perf_counter() - start
    ctx = HeadContext(encoder.out_channels, encoder.out_strides, args.num_classes)
    heads = {
        "NRD (einsum)": NRDHead(NRDConfig(impl="einsum"), ctx),
        "NRD (grouped_conv)": NRDHead(NRDConfig(impl="grouped_conv"), ctx),
        "DeepLabV3+": DeepLabV3PlusHead(DeepLabV3PlusConfig(), ctx),
        "bilinear": BilinearHead(BilinearConfig(), ctx),
    }

    rows = [(f"encoder ({args.backbone} + ASPP), once", (encoder_s, encoder_s))]
    with torch.no_grad():
        for name, head in heads.items():
            head.eval()
            rows.append((f"decoder: {name}", timed(
                lambda h=head: h.seg_logits(h(features), tuple(args.size)), args.repeats)))

        # the dynamic per-patch MLP alone, on the NRD head's own inputs
        nrd = heads["NRD (einsum)"]
        params = nrd.controller(features[-1])  # [1, P, H', W']
        _, _, h_rows, h_cols = params.shape
        s = nrd.grid_size
        grid_inputs = torch.randn(1, nrd.cfg.input_channels(), h_rows * s, h_cols * s)  # [1, C_in, H'·s, W'·s]
        layers = split_params(params.permute(0, 2, 3, 1).reshape(h_rows * h_cols, -1), nrd.shapes)  # per-patch θ
        for impl, fn in PATCH_MLP.items():
            rows.append((f"g_θ only: {impl}", timed(
                lambda f=fn: f(grid_inputs, layers, (h_rows, h_cols, s)), args.repeats)))

    print(f"CPU, {args.threads} threads, batch 1, {args.backbone} features of a {args.size[0]}×{args.size[1]} image, "
          f"C = {args.num_classes}, median of {args.repeats}")
    width = max(len(name) for name, _ in rows)
    print(f"{'what':<{width}}  median s   min s")
    for name, (fastest, median) in rows:
        print(f"{name:<{width}}  {median:8.3f}  {fastest:6.3f}")
    results = dict(rows)
    ratio = results["decoder: DeepLabV3+"][1] / results["decoder: NRD (einsum)"][1]
    print(f"DeepLabV3+ / NRD (einsum) decoder, medians: {ratio:.1f}x")


if __name__ == "__main__":
    main()

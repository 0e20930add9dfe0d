"""The evaluation loop: a model, a dataset, the recipe's test settings -> metrics.

Per-image GFLOPs (``count_gflops``) trace the whole test-time computation of each image (scales,
flips, windows) with fvcore, so input-dependent models (DToP, EQD) report what they really ran;
the dataset average is ``gflops_avg``. A model that names some of its submodules in
``aux_flop_modules`` (DToP: its auxiliary heads and grading) also gets ``gflops_avg_without_aux``,
the average without them (how the thesis' DToP tables count).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .distributed import DistInfo
from .evaluator import SegEvaluator
from .flops import aux_flop_prefixes, count_flops_split
from .inference import infer, infer_labels


class TestTimeModel(nn.Module):
    """``forward(images)`` = the recipe's full test-time inference (for FLOPs tracing)."""

    def __init__(self, model: nn.Module, test_cfg, default_crop, mean=None, std=None):
        super().__init__()
        self.model = model
        self.test_cfg = test_cfg
        self.default_crop = default_crop
        self.mean, self.std = mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return infer(self.model, images, self.test_cfg, self.default_crop, self.mean, self.std)


def evaluate_model(
    model: nn.Module,
    dataset,
    recipe,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    trimap: int | None = None,
    count_gflops: bool = False,
    progress: Callable[[int, int], None] | None = None,
    limit: int | None = None,
    on_image: Callable[[int, torch.Tensor], None] | None = None,
    keep_confusion: bool = False,
) -> dict:
    """Metrics of ``model`` on ``dataset`` (confusion matrices merged across DDP ranks).

    ``on_image(index, labels)`` receives each image's predicted labels ``[H, W]`` (the dataset index
    of the image); ``keep_confusion`` adds ``confusion``, the ``[K, K]`` pixel counts (rows: ground
    truth, columns: prediction) as nested lists."""
    from ..data import build_eval_loader

    if limit is not None:
        dataset = dataset.subset(range(min(limit, len(dataset))))
    loader = build_eval_loader(dataset, recipe.data.num_workers, dist_info.rank, dist_info.world_size)
    evaluator = SegEvaluator(dataset.num_classes, dataset.classes, dataset.ignore_index, device, trimap,
                             mean_classes=getattr(dataset, "mean_classes", None))
    core = getattr(model, "module", model)
    was_training = core.training
    core.eval()
    gflops = []
    stats: dict[str, list] = {}
    total = len(loader)
    with torch.no_grad():
        for step, batch in enumerate(loader):
            images = batch["image"].to(device, non_blocking=True)  # [1, 3, H, W] uint8 (EvalTransform)
            labels = batch["label"].to(device, non_blocking=True)
            mean, std = recipe.data.mean, recipe.data.std
            predicted = infer_labels(core, images, recipe.test, recipe.data.crop_size, mean=mean, std=std)  # [1, H, W]
            evaluator.process(predicted, labels)
            if on_image is not None:
                on_image(int(batch["index"][0]), predicted[0])
            for key, value in getattr(core, "last_stats", {}).items():
                stats.setdefault(key, []).append(value)
            if count_gflops:
                everything, aux = count_flops_split(TestTimeModel(core, recipe.test, recipe.data.crop_size, mean, std),
                                                    images)
                gflops.append((everything, everything - aux))
            if progress is not None:
                progress(step + 1, total)
    core.train(was_training)
    evaluator.all_reduce()
    result = evaluator.evaluate()
    result["num_images"] = len(dataset)
    if keep_confusion:
        result["confusion"] = evaluator.confusion.long().tolist()
    if count_gflops:
        gflops_t = torch.tensor([sum(g for g, _ in gflops), sum(g for _, g in gflops), float(len(gflops))],
                                dtype=torch.float64)
        if dist_info.enabled:
            import torch.distributed as dist

            dist.all_reduce(gflops_t)
        result["gflops_avg"] = float(gflops_t[0] / gflops_t[2].clamp(min=1))
        if aux_flop_prefixes(core):
            result["gflops_avg_without_aux"] = float(gflops_t[1] / gflops_t[2].clamp(min=1))
    for key, values in stats.items():  # e.g. DToP's exit fractions, averaged over images
        result[key] = _mean_nested(values)
    return result


def _mean_nested(values: list):
    if isinstance(values[0], (list, tuple)):
        return [sum(v[i] for v in values) / len(values) for i in range(len(values[0]))]
    return sum(values) / len(values)

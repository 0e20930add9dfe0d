"""The evaluation loop: a model, a dataset, the recipe's test settings -> each image's prediction,
and metrics where the dataset has masks.

One loop serves every evaluation (``eval``, ``eval --format-only``, training's periodic validation,
continual-learning metrics), so that what a metric scores and what a written file holds are one
computation (the recipe's test settings, ``--aug-test``, DDP sharding, loader workers, token counts).
Each image's labels go to the consumers: the :class:`~segcli.engine.evaluator.SegEvaluator` (metrics,
needs the masks) and ``on_image`` (``--show-dir``, ``--format-only``'s writer). A split read without
masks runs the same loop without the evaluator, as MMSegmentation's ``single_gpu_test(format_only=True)``
is its test loop without the metric step.

Per-image GFLOPs (``count_gflops``) trace the whole test-time computation of each image (scales,
flips, windows) with fvcore, so input-dependent models (DToP, EQD) report what they really ran;
the dataset average is ``gflops_avg``. A model that names some of its submodules in
``aux_flop_modules`` (DToP: its auxiliary heads and grading) also gets ``gflops_avg_without_aux``,
the average without them (how the thesis' DToP tables count).

Token statistics (DToP's exit and kept fractions, Shrunk's kept and edge fractions) come with
each image's score map as counts (``ops/scores.py``), summed over windows, flips, scales, images
and DDP ranks, and reported as fractions of all tokens (:func:`~segcli.ops.scores.token_fractions`):
every token of every forward weighs the same.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..ops.scores import add_counts, token_fractions
from .distributed import DistInfo, all_reduce_numbers
from .evaluator import SegEvaluator
from .flops import aux_flop_prefixes, count_flops_split
from .inference import infer, labels_of, tta_scores


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
    of the image; under DDP each rank its own images); ``keep_confusion`` adds ``confusion``, the
    ``[K, K]`` pixel counts (rows: ground truth, columns: prediction) as nested lists.

    A dataset read without masks (``dataset.labelled`` False) gets no metrics: the result holds
    ``num_images`` and the token fractions, and the predictions reach the caller through
    ``on_image`` alone (``eval --format-only``). ``trimap`` and ``keep_confusion`` need masks."""
    from ..data import build_eval_loader

    labelled = dataset.labelled
    if not labelled and (trimap is not None or keep_confusion):
        raise ValueError("trimap and confusion need the masks of a labelled dataset")
    if limit is not None:
        dataset = dataset.subset(range(min(limit, len(dataset))))
    loader = build_eval_loader(dataset, recipe.data.num_workers, dist_info.rank, dist_info.world_size)
    evaluator = SegEvaluator(dataset.num_classes, dataset.classes, dataset.ignore_index, device, trimap,
                             mean_classes=getattr(dataset, "mean_classes", None)) if labelled else None
    core = getattr(model, "module", model)
    was_training = core.training
    core.eval()
    gflops = []
    counts: dict[str, torch.Tensor] = {}  # token counts of every forward, summed where they are (module doc)
    total = len(loader)
    with torch.no_grad():
        for step, batch in enumerate(loader):
            images = batch["image"].to(device, non_blocking=True)  # [1, 3, H, W] uint8 (EvalTransform)
            mean, std = recipe.data.mean, recipe.data.std
            scores = tta_scores(core, images, recipe.test, recipe.data.crop_size, mean=mean, std=std)
            predicted = labels_of(scores)  # [1, H, W]; every window has run, so the counts are complete
            if evaluator is not None:
                evaluator.process(predicted, batch["label"].to(device, non_blocking=True))  # [1, H, W]
            if on_image is not None:
                on_image(int(batch["index"][0]), predicted[0])
            counts = add_counts(counts, scores.counts)
            if count_gflops:
                everything, aux = count_flops_split(TestTimeModel(core, recipe.test, recipe.data.crop_size, mean, std),
                                                    images)
                gflops.append((everything, everything - aux))
            if progress is not None:
                progress(step + 1, total)
    core.train(was_training)
    result = {}
    if evaluator is not None:
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
    totals = {key: float(value) for key, value in counts.items()}  # one device sync per count name
    result.update(token_fractions(_sum_across_ranks(totals, dist_info)))
    return result


def _sum_across_ranks(counts: dict[str, float], dist_info: DistInfo) -> dict[str, float]:
    """Token counts summed over the ranks. Every rank runs the same model, so the names agree,
    except on a rank that got no image (fewer images than ranks): the names are agreed on first."""
    if not dist_info.enabled:
        return counts
    import torch.distributed as dist

    names: list = [None] * dist_info.world_size
    dist.all_gather_object(names, sorted(counts))
    keys = sorted(set().union(*names))
    return dict(zip(keys, all_reduce_numbers([counts.get(key, 0.0) for key in keys]), strict=True))

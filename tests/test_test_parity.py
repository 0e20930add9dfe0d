"""Test-time parity with MMSegmentation 0.24.1's test path (issue 22, bug 2).

``tests/fixtures/official/test-parity/`` was made by ``tools/make_parity_fixtures.py --formats
test-parity``: the reduced SegViT of ``segvit-v1.pth`` run by the official code, from the
official config files (``LoadImageFromFile -> MultiScaleFlipAug(Resize(keep_ratio, min_size),
RandomFlip, Normalize, ImageToTensor)`` and ``EncoderDecoder.simple_test`` / ``aug_test``), for
the Pascal Context, ADE20K 512 / 640 and COCO-Stuff-10K test settings scaled to the model's
64 px windows, on PNG images of several aspect ratios. Here the same checkpoint goes through
``segcli convert`` and ``segcli predict`` with the recorded settings as the recipe's ``test:``
(``--set`` overrides), and the label PNGs must equal the official labels. A random model turns
any difference in the resized image, the window grid or the order of resizes into different
labels, so only an exact test path passes. Pixels where the official top-2 probabilities are
within ``near_tie_margin`` are left out (float rounding may pick either class there); of the rest
at most ``MAX_DISAGREEMENT`` may differ: a few pixels a run, for float rounding between torch
builds. The earlier test path (long side fitted, normalised float image resized with torch,
scores of views averaged as logits, padded windows cropped) fails every run.

The unit tests pin each rule on its own: mmcv's rounding, ``min_size``, MultiScaleFlipAug's
sizes, the uint8 resize before normalising, and the softmax average of ``aug_test``.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcli import api
from segcli.data.resize import keep_ratio_size, rescale_size, scale_size, tta_sizes
from segcli.data.transforms import EvalTransform, eval_view, image_tensor
from segcli.engine.inference import infer, infer_labels
from segcli.recipe import TestConfig as RecipeTestConfig

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "official" / "test-parity"
RECIPE = FIXTURES / "recipes" / "segvit_v1_small.yaml"
MAX_DISAGREEMENT = 1e-4  # fraction of decisive pixels allowed to differ (a few pixels a run; see module doc)
TEST_KEYS = ("mode", "crop_size", "stride", "scale", "min_size", "scales", "flip")


def _fixture():
    info = json.loads((PARITY / "test-parity.json").read_text())
    with np.load(PARITY / "labels.npz") as arrays:
        return info, {key: arrays[key] for key in arrays.files}


def _runs():
    if not (PARITY / "test-parity.json").is_file():
        return []
    return [run["name"] for run in json.loads((PARITY / "test-parity.json").read_text())["runs"]]


def segcli_labels(tmp_path: Path, run: dict, images: list[str]) -> dict[str, np.ndarray]:
    """``segcli convert`` with the run's test settings, then ``segcli predict``: label PNGs."""
    overrides = [f"test.{key}={json.dumps(run['test'][key])}" for key in TEST_KEYS]
    norm = run["img_norm_cfg"]
    overrides += [f"data.mean={json.dumps(norm['mean'])}", f"data.std={json.dumps(norm['std'])}"]
    ckpt = api.convert(FIXTURES / "official" / "segvit-v1.pth", recipe=RECIPE, out=tmp_path / "m.pt",
                       overrides=overrides).path
    result = api.predict([str(PARITY / name) for name in images], ckpt, out_dir=tmp_path / "pred", device="cpu")
    assert not result.failed
    return {name: cv2.imread(str(tmp_path / "pred" / f"{Path(name).stem}.png"), cv2.IMREAD_UNCHANGED)
            for name in images}


def agreement(run_name: str, tmp_path: Path) -> tuple[float, int]:
    """(fraction of decisive pixels where segcli's labels equal the official ones, decisive pixels)."""
    info, arrays = _fixture()
    run = next(r for r in info["runs"] if r["name"] == run_name)
    images = [name for name, entry in run["images"].items() if "skipped" not in entry]
    ours = segcli_labels(tmp_path, run, images)
    same = total = 0
    for name in images:
        official = arrays[f"{run_name}/{name}/labels"]
        decisive = ~arrays[f"{run_name}/{name}/near_tie"]
        assert ours[name].shape == official.shape
        same += int((ours[name] == official)[decisive].sum())
        total += int(decisive.sum())
    return same / total, total


@pytest.mark.parametrize("run_name", _runs())
def test_predict_labels_equal_the_official_test_path(run_name, tmp_path):
    fraction, total = agreement(run_name, tmp_path)
    assert total > 10000
    assert fraction >= 1 - MAX_DISAGREEMENT, f"{run_name}: {fraction:.4%} of pixels agree"


# ----------------------------------------------------------------------------- the rules, one by one


def test_min_size_makes_the_short_side_and_leaves_the_long_side_uncapped():
    # SegViT Pascal Context: Resize(img_scale=(520, 520), keep_ratio=True, min_size=480)
    assert keep_ratio_size(375, 500, (520, 520), 480) == (520, 693)
    assert keep_ratio_size(500, 375, (520, 520), 480) == (693, 520)
    assert keep_ratio_size(375, 500, (520, 520)) == (390, 520)  # without min_size: fit the long side
    # COCO-Stuff (2048, 512), min_size=512: a 1:10 image keeps a 512 short side, the long side passes 2048
    assert keep_ratio_size(100, 1000, (2048, 512), 512) == (512, 5120)
    assert keep_ratio_size(100, 1000, (2048, 512)) == (205, 2048)
    assert keep_ratio_size(300, 400, (200, 200), 480) == (480, 640)  # min(scale) below min_size


def test_sizes_round_as_mmcv_and_ratios_scale_the_pair():
    assert scale_size(5, 7, 0.5) == (3, 4)  # int(x + 0.5): halves go up (Python's round would give 2)
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)
    # MultiScaleFlipAug: ratio 0.75 scales the pair (int), then the keep-ratio fit
    assert tta_sizes(375, 500, (2048, 512), [0.75, 1.25]) == [(384, 512), (640, 853)]
    # without a scale the ratio scales the image's own (w, h) with int() before the fit:
    # 101 * 0.75 = 75.75 -> 75, so the width is 75, not round(75.75) = 76
    assert tta_sizes(75, 101, None, [0.75]) == [(56, 75)]
    assert tta_sizes(75, 101, None, [1.0]) == [(75, 101)]


def test_the_uint8_image_is_resized_before_normalising():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    view = eval_view(image_tensor(image), (52, 75), mean, std)  # [1, 3, 52, 75]
    resized = cv2.resize(image, (75, 52), interpolation=cv2.INTER_LINEAR)  # mmcv.imresize, cv2 backend
    expected = (resized.astype(np.float32) - np.float32(mean)) / np.float32(std)
    assert view.dtype == torch.float32 and view.shape == (1, 3, 52, 75)
    np.testing.assert_allclose(view[0].permute(1, 2, 0).numpy(), expected, rtol=1e-6, atol=1e-6)
    normalised_first = torch.nn.functional.interpolate(eval_view(image_tensor(image), (37, 53), mean, std),
                                                       size=(52, 75), mode="bilinear", align_corners=False)
    assert (normalised_first - view).abs().max() > 0.01  # the old order: not the same input
    # the eval dataset hands the engine uint8 images; a normalised single view on request
    uint8, _ = EvalTransform()(image, np.zeros((37, 53), np.uint8))
    assert uint8.dtype == torch.uint8 and torch.equal(uint8, image_tensor(image)[0])
    single, _ = EvalTransform(mean, std, scale=(75, 52))(image, np.zeros((37, 53), np.uint8))
    size = keep_ratio_size(37, 53, (75, 52))
    assert torch.equal(single, eval_view(image_tensor(image), size, mean, std)[0])


class _PixelScores(torch.nn.Module):
    """A 3x3 convolution (zero padding, as the engine's): per-class scores at the input size, not
    symmetric under flips."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(4)

    def forward(self, images):
        return self.conv(images)  # [B, 5, H, W]


def test_tta_averages_softmax_probabilities_of_views_resized_to_the_image():
    net = _PixelScores().eval()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    images, mean, std = image_tensor(image), [127.5] * 3, [127.5] * 3
    cfg = RecipeTestConfig(mode="whole", scale=(60, 40), scales=(0.75, 1.25), flip=True)
    probs, logits = 0, 0
    for size in tta_sizes(30, 44, cfg.scale, cfg.scales):
        for flip in (False, True):
            x = eval_view(images, size, mean, std)
            x = x.flip(-1) if flip else x
            scores = torch.nn.functional.interpolate(net(x), size=(30, 44), mode="bilinear", align_corners=False)
            scores = scores.flip(-1) if flip else scores
            probs, logits = probs + scores.softmax(1), logits + scores
    probs, logits = probs / 4, logits / 4
    with torch.no_grad():
        labels = infer_labels(net, images, cfg, (64, 64), band_bytes=1, mean=mean, std=std)
        dense = infer(net, images, cfg, (64, 64), mean, std)
    assert torch.allclose(dense, probs, rtol=1e-5, atol=1e-6)  # aug_test's average, not of logits
    assert torch.equal(labels, probs.argmax(1))
    assert (logits.argmax(1) != probs.argmax(1)).any()  # averaging logits would give other labels

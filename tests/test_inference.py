"""Labels without the full score tensor (``engine/inference.py`` ``infer_labels``, ``ops/scores.py``).

``infer_labels`` must give ``infer(...).argmax(1)`` in every mode (whole, slide, multi-scale +
flip) for every kind of model: ATM heads (both mask resolutions), logit heads (SETR, FCN, NRD), DToP with exits (both
combining rules) and SegViT-CL's concatenated heads. Ties aside: labels are compared where the
full scores' top-2 margin exceeds 1e-5 (relative to their scale).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from segcli import api
from segcli.data import SYNTHETIC_CLASSES
from segcli.engine.inference import SlideScores, infer, infer_labels, labels_of, tta_scores
from segcli.ops.scores import UpsampledScores, resize_rows
from segcli.recipe import recipe_from_dict

NUM_CLASSES = len(SYNTHETIC_CLASSES)
VIT = {"type": "vit", "name": "test_vit", "img_size": 64, "patch_size": 8, "out_indices": [2, 3, 5],
       "drop_path_rate": 0.0}
ATM = {"type": "atm", "embed_dim": 32, "num_heads": 1, "num_layers": 1}
RESNET = {"type": "resnet", "name": "resnet18", "out_indices": [1, 4], "aspp": True, "aspp_channels": 16,
          "aspp_dilations": [1, 2, 3]}
MODELS = {
    "atm": {"backbone": VIT, "decode_head": {**ATM, "in_index": [2, 1]}},
    "atm_full": {"backbone": VIT, "decode_head": {**ATM, "in_index": [2, 1], "mask_resolution": "full"}},
    "atm_full_mask_size": {"backbone": VIT, "decode_head": {**ATM, "in_index": [2], "mask_resolution": "full",
                                                            "mask_size": 48}},
    "setr": {"backbone": VIT, "decode_head": {"type": "setr", "in_index": 2, "channels": 16}},
    "fcn": {"backbone": VIT, "decode_head": {"type": "fcn", "in_index": 2, "channels": 16, "kernel_size": 3}},
    "nrd": {"backbone": RESNET, "decode_head": {"type": "nrd", "controller_channels": 16}},
    "dtop_atm": {"type": "dtop", "options": {"p0": 0.5}, "backbone": VIT, "decode_head": {**ATM, "in_index": [2]},
                 "aux_heads": [{**ATM, "in_index": [0]}, {**ATM, "in_index": [1]}]},
    "dtop_setr": {"type": "dtop", "options": {"p0": 0.5}, "backbone": VIT,
                  "decode_head": {"type": "setr", "in_index": 2, "channels": 16},
                  "aux_heads": [{"type": "fcn", "in_index": 0, "channels": 16, "kernel_size": 1},
                                {"type": "fcn", "in_index": 1, "channels": 16, "kernel_size": 3}]},
    "continual": {"type": "continual", "options": {"task_classes": [5, 3]}, "backbone": VIT,
                  "decode_head": {**ATM, "in_index": [2]}},
}
MODES = {
    "whole": SimpleNamespace(mode="whole", crop_size=None, stride=None, scale=None, scales=(1.0,), flip=False, min_size=None),
    "slide": SimpleNamespace(mode="slide", crop_size=(32, 48), stride=(19, 21), scale=None, scales=(1.0,), flip=False, min_size=None),
    "tta": SimpleNamespace(mode="whole", crop_size=None, stride=None, scale=None, scales=(0.75, 1.25), flip=True, min_size=None),
    "slide_tta": SimpleNamespace(mode="slide", crop_size=(32, 48), stride=(24, 24), scale=None, scales=(0.75, 1.25),
                                 flip=True, min_size=None),
}


def build(name: str):
    torch.manual_seed(0)
    raw = {"model": copy.deepcopy(MODELS[name]), "data": {"type": "synthetic", "crop_size": [64, 64]}}
    net = api.build_model(recipe_from_dict(raw), num_classes=NUM_CLASSES).eval()
    with torch.no_grad():  # confident heads, so that DToP's tokens exit at p0 = 0.5
        for head in [getattr(net, "decode_head", None), *getattr(net, "aux_heads", [])]:
            if hasattr(head, "class_head"):
                head.class_head.weight.mul_(40)
            elif hasattr(head, "classifier"):
                head.classifier.weight.mul_(300)
            elif hasattr(head, "controller"):  # NRD: generated networks start near zero
                for param in head.controller.parameters():
                    param.normal_(std=0.5)
    return net


def assert_same_labels(labels: torch.Tensor, scores: torch.Tensor) -> None:
    top2 = scores.topk(2, dim=1).values  # [B, 2, H, W]
    decisive = (top2[:, 0] - top2[:, 1]) > 1e-5 * float(scores.abs().max().clamp_min(1))
    assert decisive.float().mean() > 0.9
    assert labels.dtype == torch.long and labels.shape == scores.argmax(1).shape
    assert torch.equal(labels[decisive], scores.argmax(1)[decisive])


@pytest.mark.parametrize("mode", ["whole", "slide", "tta"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_labels_equal_the_full_scores_argmax(name, mode):
    net = build(name)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 70, 90)  # not a multiple of any stride: padding and cropping
    with torch.no_grad():
        scores = infer(net, images, MODES[mode], (64, 64))
        labels = infer_labels(net, images, MODES[mode], (64, 64), band_bytes=1)  # one row per band
        assert_same_labels(labels, scores)
        assert_same_labels(infer_labels(net, images, MODES[mode], (64, 64)), scores)  # band size is no matter
    if name.startswith("dtop") and mode == "whole":
        counts = tta_scores(net, images, MODES[mode], (64, 64)).counts
        assert 0 < counts["kept"] < counts["tokens"]  # tokens did exit: the combined map is tested


def test_labels_with_slide_windows_and_tta_together():
    net = build("atm")
    images = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert_same_labels(infer_labels(net, images, MODES["slide_tta"], (64, 64), band_bytes=1),
                           infer(net, images, MODES["slide_tta"], (64, 64)))


@pytest.mark.parametrize("name", ["atm", "nrd", "dtop_setr"])
def test_full_of_a_score_map_is_the_models_forward(name):
    net = build(name)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(net.forward_scores(images).full(), net(images))


def test_rows_match_the_full_tensor_in_any_order():
    scores = torch.randn(2, 5, 7, 9)
    for extent, size in [((50, 61), (50, 61)), ((56, 72), (53, 70)), ((4, 5), (4, 5)), ((7, 30), (7, 30))]:
        lazy = UpsampledScores(scores, extent, size)
        full = lazy.full()
        for start, stop in [(0, 1), (3, 4), (size[0] - 2, size[0]), (1, size[0])]:
            assert torch.allclose(lazy.rows(start, stop), full[:, :, start:stop], atol=1e-6)
        # a band of a band: resize_rows reads only the source rows it needs
        band = resize_rows(lambda a, b: scores[:, :, a:b], 7, size, 2, size[0] - 1)
        assert torch.allclose(band, torch.nn.functional.interpolate(
            scores, size=size, mode="bilinear", align_corners=False)[:, :, 2:size[0] - 1], atol=1e-6)


def test_slide_runs_each_window_once_when_read_in_order():
    calls = []
    net = build("setr")
    forward = net.forward_scores

    def counting(images):
        calls.append(tuple(images.shape[-2:]))
        return forward(images)

    net.forward_scores = counting
    images = torch.randn(1, 3, 100, 70)
    cfg = MODES["slide"]
    with torch.no_grad():
        infer_labels(net, images, cfg, (64, 64), band_bytes=1)
    windows = len(calls)
    assert windows == 5 * 3  # (100 - 32) / 20 -> 5 rows of windows, (70 - 40) / 24 -> 3 columns
    assert tta_scores(net, images, cfg, (64, 64)).size == (100, 70)


def test_one_slide_window_is_whole_mode():
    """A slide test whose one window covers the image (the ViT-B recipes on a 512² image) runs what
    whole mode runs: the model's own score map, without the window bookkeeping (issue 23: it cost
    1.37x the encoder against 1.11x in whole mode; ``benchmarks/slide_vs_whole.py``)."""
    net = build("atm")
    images = torch.randn(1, 3, 64, 64)
    one_window = SimpleNamespace(**{**vars(MODES["slide"]), "crop_size": (64, 64), "stride": (43, 43)})
    with torch.no_grad():
        slide, whole = tta_scores(net, images, one_window, (64, 64)), tta_scores(net, images, MODES["whole"], (64, 64))
        assert type(slide) is type(whole) and not isinstance(slide, SlideScores)
        assert torch.equal(labels_of(slide), labels_of(whole))
        several = tta_scores(net, torch.randn(1, 3, 64, 96), one_window, (64, 64))
    assert isinstance(several, SlideScores)  # two windows across: averaged where they overlap


@pytest.mark.parametrize("classes, low, size, peaked", [
    (150, (8, 9), (128, 141), True),    # ATM-like: few classes compete in each region
    (40, (33, 17), (257, 130), True),   # odd factors, a crop of the extent below
    (64, (6, 6), (96, 96), False),      # flat scores: the candidates fill up, the dense band is used
])
def test_pruned_label_rows_equal_the_dense_argmax(classes, low, size, peaked):
    gen = torch.Generator().manual_seed(classes)
    field = torch.randn(2, classes, 3, 3, generator=gen) * (4.0 if peaked else 0.01)
    scores = F.interpolate(field, size=low, mode="bilinear", align_corners=False) + 0.2 * torch.randn(2, classes, *low, generator=gen)
    extent = (size[0] + 7, size[1] + 5)
    lazy = UpsampledScores(scores, extent, size)
    dense = F.interpolate(scores, size=extent, mode="bilinear", align_corners=False)[..., :size[0], :size[1]].argmax(1)
    for start, stop in ((0, size[0]), (5, 40), (size[0] - 3, size[0])):
        got = lazy.argmax_rows(start, stop)
        assert got.shape == (2, stop - start, size[1])
        assert torch.equal(got, dense[:, start:stop])
    assert torch.equal(labels_of(lazy, band_bytes=1 << 16), dense)  # small bands: many band edges


def test_compile_failures_become_one_line_errors_only_when_compiled():
    from torch._dynamo.exc import TorchDynamoException

    from segcli.engine.inference import compile_failures_reported
    from segcli.errors import SegcliError

    with pytest.raises(SegcliError, match="torch.compile failed: no backend"):
        with compile_failures_reported(True):
            raise TorchDynamoException("no backend\nlong trace")
    with pytest.raises(TorchDynamoException):  # not compiled: left as it is
        with compile_failures_reported(False):
            raise TorchDynamoException("no backend")
    with pytest.raises(ValueError):  # not a compile failure
        with compile_failures_reported(True):
            raise ValueError("bad input")


@pytest.mark.parametrize("recipe, compiled", [
    ("tiny/segvit.yaml", {"backbone", "decode_head"}),
    ("tiny/segvit_shrunk.yaml", {"decode_head"}),  # its encoder runs block by block
    ("tiny/dtop.yaml", None),  # as DToP: embed / run_block / forward_tokens: nothing to compile -> refused
])
def test_compile_wraps_what_inference_runs(recipe, compiled, monkeypatch):
    """The bug: --compile wrapped backbone.forward and decode_head.forward, which DToP never calls:
    the flag was a silent no-op there."""
    import shutil

    from conftest import REPO

    from segcli.build import without_pretrained
    from segcli.engine import inference
    from segcli.engine.inference import compile_for_inference
    from segcli.errors import SegcliError

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)  # the compiler check passes anywhere
    monkeypatch.setattr(inference, "cpu_vector_isa", lambda: "")  # and the AVX2 refusal (its own test) too
    dtop = ["model.type=dtop", "model.options={p0: 0.95}"] if compiled is None else []
    model = api.build_model(without_pretrained(api.load_recipe(REPO / "recipes" / recipe, dtop)), num_classes=8)
    if compiled is None:
        with pytest.raises(SegcliError, match="compile nothing"):
            compile_for_inference(model, torch.device("cpu"))
        return
    compile_for_inference(model, torch.device("cpu"))  # lazy: nothing is compiled until the first call
    wrapped = {name for name in ("backbone", "decode_head") if type(getattr(model, name)).__name__ == "OptimizedModule"}
    assert wrapped == compiled

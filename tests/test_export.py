"""``segcli export``: every method exports; the exported file agrees with PyTorch; what cannot be
exported says so; ``predict`` on a .onnx file writes the labels of the checkpoint."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, tiny_overrides

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from segcli import api  # noqa: E402
from segcli.build import dataset_meta  # noqa: E402
from segcli.engine.checkpoint import save_checkpoint  # noqa: E402
from segcli.errors import SegcliError  # noqa: E402

TINY = REPO / "recipes" / "tiny"

# name -> (recipe, extra --set overrides); ResNet recipes have no patch size / img size
METHODS = {
    "setr": ("setr.yaml", {}),
    "segvit_low": ("segvit.yaml", {}),
    "segvit_full": ("segvit.yaml", {"model.decode_head.mask_resolution": "full"}),
    "fcn": ("bilinear.yaml", {"model.decode_head": "{type: fcn, channels: 32}"}),
    "bilinear": ("bilinear.yaml", {}),
    "deeplabv3plus": ("bilinear.yaml", {"model.decode_head": "{type: deeplabv3plus, channels: 32}"}),
    "nrd_einsum": ("nrd.yaml", {}),
    "nrd_grouped_conv": ("nrd.yaml", {"model.decode_head.impl": "grouped_conv"}),
    "shrunk_qd": ("segvit_shrunk_qd0.yaml", {}),
    "dtop_p1": ("dtop.yaml", {"model.type": "dtop", "model.options": "{p0: 1.0}"}),
}


def _overrides(root: Path, recipe: str, extra: dict) -> list[str]:
    sets = tiny_overrides(root, **extra)[1::2]
    if recipe in ("bilinear.yaml", "nrd.yaml"):  # ResNet: drop the ViT keys
        sets = [s for s in sets if not s.startswith(("model.backbone.patch_size", "model.backbone.img_size"))]
    return sets


def make_checkpoint(root: Path, folder: Path, name: str, **extra) -> Path:
    """A checkpoint of random weights (seeded) for a tiny recipe: no training needed."""
    recipe_file, options = METHODS[name]
    recipe = api.load_recipe(TINY / recipe_file, _overrides(root, recipe_file, {**options, **extra}))
    (val,) = api.build_datasets(recipe, splits=("val",))
    torch.manual_seed(0)
    path = folder / f"{name}.pt"
    save_checkpoint(path, {"version": "test", "recipe": recipe.to_dict(), "meta": dataset_meta(val),
                           "model": api.build_model(recipe).state_dict()})
    return path


@pytest.fixture(scope="module")
def onnx_export(synth_root, tmp_path_factory):
    """``onnx_export(name)``: the method's checkpoint exported once per module, as
    ``test_every_method_exports_to_onnx`` exports it (ONNX, scores, static at the crop size 64x64),
    for every test that needs such a file: an export is the costly step of this file."""
    folder = tmp_path_factory.mktemp("exported")
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = api.export(make_checkpoint(synth_root, folder, name), format="onnx", output="scores")
        return done[name]

    return get


def assert_agrees(result):
    assert result.verified
    for check in result.checks:
        assert check.label_agreement >= 0.999, check
        if check.rel_diff is not None:
            assert check.rel_diff <= 1e-4, check


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_exports_to_onnx(name, onnx_export):
    result = onnx_export(name)
    folder = result.path.parent
    assert result.path == folder / f"{name}.onnx" and result.path.is_file()
    assert result.dynamic_axes == [] and result.opset == 18 and result.shape == (64, 64)
    assert [check.shape for check in result.checks] == [(1, 8, 64, 64)]  # scores [B, K, H, W]
    assert_agrees(result)
    assert not list(folder.glob(".*.tmp"))  # no temp file left behind


@pytest.mark.parametrize("name", ["segvit_low"])  # Shrunk QD takes the same ATM path (checked by hand)
def test_dynamic_export_runs_two_sizes(name, synth_root, tmp_path):
    ckpt = make_checkpoint(synth_root, tmp_path, name)
    # traced at a size other than the ViT's img_size (64): at that size the position embedding is
    # used as is, a branch that holds for 49..64 px only
    result = api.export(ckpt, format="onnx", output="scores", dynamic=True, shape=(80, 96))
    assert "height" in result.dynamic_axes
    assert len(result.checks) == 2 and result.checks[0].shape != result.checks[1].shape
    assert_agrees(result)
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    loaded = api.load_checkpoint(ckpt)
    ckpt_model, recipe = loaded.model, loaded.recipe
    image = torch.rand(1, 3, 80 - 9, 96) * 255
    out = session.run(None, {"image": image.numpy()})[0]
    mean, std = torch.tensor(recipe.data.mean).view(1, 3, 1, 1), torch.tensor(recipe.data.std).view(1, 3, 1, 1)
    from segcli.engine.inference import scores_padded

    with torch.no_grad():
        expected = scores_padded(ckpt_model, (image - mean) / std).full()
    assert out.shape == tuple(expected.shape)
    assert (out.argmax(1) == expected.argmax(1).numpy()).mean() >= 0.999


def test_labels_output_and_other_formats(synth_root, tmp_path):
    ckpt = make_checkpoint(synth_root, tmp_path, "segvit_low")
    labels = api.export(ckpt, format="onnx", output="labels", batch=2, opset=20, out=tmp_path / "l.onnx")
    assert labels.checks[0].max_abs_diff is None and labels.checks[0].shape == (2, 64, 64)
    assert_agrees(labels)
    program = api.export(ckpt, format="exported-program", output="scores")
    assert program.path.name == "segvit_low.pt2"
    assert_agrees(program)
    traced = api.export(ckpt, format="torchscript", output="scores")
    assert traced.path.name == "segvit_low.torchscript.pt"
    assert_agrees(traced)


@pytest.mark.parametrize("name, extra, key, fix", [
    ("dtop_p1", {"model.options": "{p0: 0.5}"}, "model.options.p0", "p0 = 1"),
    ("shrunk_qd", {"model.options": "{qd_index: 0, qu: inherit, edge: true}"}, "model.options.edge", "edge: false"),
], ids=["dtop_p0_0.5", "shrunk_eqd"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_data_dependent_models_are_refused_in_one_line(name, extra, key, fix, fmt, synth_root, tmp_path, monkeypatch):
    from segcli.workflows import export as export_module

    def never(*args, **kwargs):
        raise AssertionError("the declaration is read before anything is captured")

    monkeypatch.setattr(export_module, "capture", never)
    ckpt = make_checkpoint(synth_root, tmp_path, name, **extra)
    with pytest.raises(SegcliError, match="cannot be exported faithfully: .*data-dependent token set") as err:
        api.export(ckpt, format=fmt)
    message = str(err.value)
    assert "\n" not in message and message.startswith(key + ":") and fix in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.pt"]  # nothing written


def test_declarations_follow_the_options(synth_root):
    """The declared support is the model's, option by option (not the method name's)."""
    def support(name, **extra):
        recipe_file, options = METHODS[name]
        recipe = api.load_recipe(TINY / recipe_file, _overrides(synth_root, recipe_file, {**options, **extra}))
        with torch.device("meta"):  # a declaration depends on the configuration, not on weights: no init
            return api.build_model(recipe).export_support()

    assert support("dtop_p1").graph and not support("dtop_p1").dynamic  # p0 = 1: the unpruned forward, static
    assert not support("dtop_p1", **{"model.options": "{p0: 0.9}"}).graph
    assert support("shrunk_qd").dynamic and not support("shrunk_qd", **{
        "model.options": "{qd_index: 0, qu: inherit, edge: true}"}).graph
    nrd = support("nrd_grouped_conv")
    assert nrd.graph and not nrd.dynamic and nrd.key == "--dynamic" and "NRDHead" in nrd.reason
    # README "Deploy": dynamic ONNX runs for the ATM heads only; logit heads bake sizes in
    dynamic = {name for name in METHODS if support(name).dynamic}
    assert dynamic == {"segvit_low", "segvit_full", "shrunk_qd"}
    assert all(support(name).graph for name in METHODS)


def test_dynamic_nrd_is_refused_in_one_line(synth_root, tmp_path):
    """Logit heads (NRD here) turn sizes into Python ints and declare it: refused before the capture,
    nothing written."""
    ckpt = make_checkpoint(synth_root, tmp_path, "nrd_einsum")
    with pytest.raises(SegcliError, match="cannot be exported with dynamic sizes: the NRDHead turns sizes") as err:
        api.export(ckpt, output="scores", dynamic=True, shape=(80, 96))
    assert "\n" not in str(err.value) and "without --dynamic" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nrd_einsum.pt"]


def test_an_optimistic_declaration_is_caught_by_verification(synth_root, tmp_path, monkeypatch):
    """NRD's declaration is true: claimed dynamic, its dynamic graph does not run at a second size,
    and the file is kept aside rather than shipped."""
    from segcli.models.exportable import FULL
    from segcli.models.heads.nrd import NRDHead

    monkeypatch.setattr(NRDHead, "export_support", lambda self: FULL)
    ckpt = make_checkpoint(synth_root, tmp_path, "nrd_einsum")
    with pytest.raises(SegcliError, match="does not run at input") as err:  # the .pt2's guard (ONNX: a Reshape)
        api.export(ckpt, format="exported-program", output="scores", dynamic=True, shape=(80, 96))
    assert "\n" not in str(err.value)
    assert (tmp_path / "nrd_einsum.pt2.unverified").is_file() and not (tmp_path / "nrd_einsum.pt2").exists()


def test_cli_export_parses_renders_and_refuses(cli, onnx_export, tmp_path, monkeypatch):
    """The CLI's part: an existing file and bad options are refused in one line before anything
    runs; the flags reach ``api.export`` and its result is rendered, as text and ``--json`` (the
    export itself is tested above, and its real result is what is rendered here)."""
    import json

    from segcli import api as api_module

    exported = onnx_export("bilinear")  # static, scores
    ckpt = exported.path.with_suffix(".pt")
    before = exported.path.stat().st_mtime_ns
    res = cli("export", ckpt, "--output", "scores")
    assert res.exit_code == 2 and "exists" in res.output and "--overwrite" in res.output
    assert exported.path.stat().st_mtime_ns == before
    for args, text in ((["--format", "onx"], "did you mean 'onnx'"), (["--opset", "9"], "opset 9"),
                       (["--format", "torchscript", "--dynamic"], "TorchScript")):
        res = cli("export", ckpt, "--out", tmp_path / "x.onnx", *args)
        assert res.exit_code == 2 and text in res.output, res.output
    res = cli("export", tmp_path / "missing.pt")
    assert res.exit_code == 2 and "checkpoint not found" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written

    calls = []
    monkeypatch.setattr(api_module, "export", lambda checkpoint, **kw: calls.append((checkpoint, kw)) or exported)
    res = cli("export", ckpt, "--json", "--output", "scores", "--shape", "64", "64", "--opset", "19", "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == json.loads(json.dumps(exported.to_dict()))
    assert [(Path(c), kw) for c, kw in calls] == [(ckpt, {
        "format": "onnx", "shape": (64, 64), "dynamic": False, "batch": 1, "output": "scores", "opset": 19,
        "out": None, "overwrite": True})]
    res = cli("export", ckpt, "--overwrite", "--output", "scores")
    assert res.exit_code == 0 and "max abs diff" in res.output and "labels agree" in res.output


def test_failed_verification_keeps_the_file_as_unverified(synth_root, tmp_path, monkeypatch):
    from segcli.workflows import export as export_module

    ckpt = make_checkpoint(synth_root, tmp_path, "bilinear")
    monkeypatch.setattr(export_module, "passes", lambda check: False)
    with pytest.raises(SegcliError, match="disagrees with PyTorch"):
        api.export(ckpt, format="exported-program")  # the cheapest capture: the rule is the same for every format
    assert (tmp_path / "bilinear.pt2.unverified").is_file() and not (tmp_path / "bilinear.pt2").exists()


def test_missing_extra_is_named(synth_root, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    ckpt = make_checkpoint(synth_root, tmp_path, "bilinear")
    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(SegcliError, match=r"needs onnxscript.*segcli\[export\]"):
        api.export(ckpt)


def test_predict_with_onnx_writes_the_labels_of_the_checkpoint(cli, synth_root, tmp_path, onnx_export):
    static = onnx_export("segvit_low")  # static at 64x64, the synthetic images' size
    ckpt = static.path.with_suffix(".pt")
    images = synth_root / "images" / "val"
    for source, folder in ((ckpt, "pt"), (static.path, "onnx")):
        res = cli("predict", images, "--checkpoint", source, "--out", tmp_path / folder, "--overlay")
        assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "pt").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "onnx").iterdir()) and len(names) == 9
    for name in names:
        if name.endswith("_overlay.png") or name.endswith("_color.png"):
            continue
        a = cv2.imread(str(tmp_path / "pt" / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "onnx" / name), cv2.IMREAD_UNCHANGED)
        assert (a == b).mean() >= 0.999
    # a static file meets an image of another size: one line, exit 2
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((32, 32, 3), np.uint8))
    res = cli("predict", small, "--checkpoint", static.path, "--out", tmp_path / "s")
    assert res.exit_code == 2 and "takes 64x64 images" in res.output
    # an ONNX file that segcli did not write
    (tmp_path / "foreign.onnx").write_bytes(b"not a model")
    res = cli("predict", next(images.iterdir()), "--checkpoint", tmp_path / "foreign.onnx", "--out", tmp_path / "f")
    assert res.exit_code == 2 and "onnxruntime cannot load" in res.output


def test_benchmark_takes_an_onnx_file_beside_its_checkpoint(onnx_export):
    exported = onnx_export("bilinear")  # static at 64x64
    ckpt = exported.path.with_suffix(".pt")
    out = api.benchmark([str(ckpt), str(exported.path)], shape=(64, 64), repeats=1, warmup=1, threads=1,
                        device="cpu")
    pytorch, onnx = out["models"]
    assert onnx["source"] == "onnx" and onnx["name"] == "bilinear.onnx" and onnx["shape"] == [64, 64]
    assert onnx["gflops"] == pytest.approx(pytorch["gflops"], rel=1e-6)  # the embedded recipe's model
    assert onnx["latency_median_s"] > 0
    with pytest.raises(SegcliError, match="PyTorch models"):
        api.benchmark([str(exported.path)], backbone_only=True, repeats=1, device="cpu")

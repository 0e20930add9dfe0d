"""The CLI end to end on real files: train -> eval -> predict -> flops, resume, bad inputs."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, tiny_overrides

SETR = REPO / "recipes" / "tiny" / "setr.yaml"


def _losses(path):
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_train_eval_predict_flops(cli, synth_root, tmp_path):
    work = tmp_path / "run"
    res = cli("train", SETR, "--work-dir", work, *tiny_overrides(synth_root))
    assert res.exit_code == 0, res.output
    for name in ("last.pt", "best.pt", "metrics.jsonl", "recipe.yaml"):
        assert (work / name).is_file(), name
    assert "segcli predict" in res.output  # tells the user what to do next
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "mIoU" in r] == [2, 4]

    res = cli("eval", work / "best.pt", "--json", "--trimap", "3", "--flops")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    for key in ("mIoU", "mAcc", "aAcc", "per_class", "trimap_mIoU", "gflops_avg"):
        assert key in metrics
    assert len(metrics["per_class"]) == 8 and metrics["gflops_avg"] > 0

    images = synth_root / "images" / "val"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pred"
    res = cli("predict", images, tmp_path / "broken.jpg", "--checkpoint", work / "best.pt", "--out", out, "--overlay")
    assert res.exit_code == 2  # the broken file is reported, the others still written
    assert "broken.jpg" in res.output
    for image in images.iterdir():
        label = cv2.imread(str(out / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert label is not None and label.shape == (64, 64) and label.max() < 8
        assert (out / f"{image.stem}_color.png").is_file() and (out / f"{image.stem}_overlay.png").is_file()

    res = cli("flops", SETR, "--shape", "64", "96", "--json", "--set", "model.backbone.patch_size=16")
    assert res.exit_code == 0, res.output
    flops = json.loads(res.stdout)
    assert flops["gflops"] > 0 and flops["params_m"] > 1
    long_name = tmp_path / ("a_recipe_with_a_name_longer_than_a_terminal_line_" * 2 + ".yaml")
    long_name.write_text(f"_base_: {SETR}\n")
    res = cli("flops", long_name, "--shape", "64", "96", "--set", "model.backbone.patch_size=16")
    line = f"{long_name}: {flops['gflops']:.2f} GFLOPs at 64x96, {flops['params_m']:.2f} M parameters"
    assert res.exit_code == 0 and line in res.output.splitlines(), res.output  # one line, however long


def test_resume_is_exact(cli, synth_root, tmp_path):
    from segcli import api
    from segcli.recipe import load_recipe

    overrides = tiny_overrides(synth_root, **{"train.max_iters": 6, "train.eval_interval": 3})
    full = tmp_path / "full"
    assert cli("train", SETR, "--work-dir", full, *overrides).exit_code == 0

    keys = [v for i, v in enumerate(overrides) if i % 2 == 1]
    recipe = load_recipe(SETR, keys)
    part = tmp_path / "part"

    def stop_at_4(event, info):
        if event == "step" and info["iter"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.train(recipe, part, callback=stop_at_4)
    assert torch.load(part / "last.pt", weights_only=True)["iteration"] == 4
    res = cli("train", SETR, "--work-dir", part, "--resume", *overrides)
    assert res.exit_code == 0, res.output
    assert np.allclose(_losses(part / "metrics.jsonl"), _losses(full / "metrics.jsonl"), rtol=1e-5, atol=1e-6)
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_bad_inputs_exit_2_without_traceback(cli, synth_root, tmp_path):
    res = cli("train", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "nope.yaml" in res.output and "Traceback" not in res.output
    res = cli("train", SETR, "--set", "train.max_iter=3")
    assert res.exit_code == 2 and "did you mean 'max_iters'" in res.output
    res = cli("train", SETR, "--set", "data.type=folder", "--set", "data.root=" + str(tmp_path / "missing"))
    assert res.exit_code == 2 and "missing" in res.output
    res = cli("eval", tmp_path / "none.pt")
    assert res.exit_code == 2 and "none.pt" in res.output
    (tmp_path / "foreign.pt").write_bytes(b"\x00\x01junk")
    res = cli("predict", "x.jpg", "--checkpoint", tmp_path / "foreign.pt")
    assert res.exit_code == 2 and "foreign.pt" in res.output
    res = cli("predict", "x.jpg", "--model", "segvitt")
    assert res.exit_code == 2 and "did you mean 'segvit'" in res.output


def test_checkpoint_of_the_wrong_model(cli, synth_root, tmp_path):
    work = tmp_path / "run"
    assert cli("train", SETR, "--work-dir", work, *tiny_overrides(synth_root, **{"train.max_iters": 1,
                                                                                  "train.eval_interval": 1})).exit_code == 0
    res = cli("eval", work / "last.pt", "--set", "model.decode_head.channels=64")
    assert res.exit_code == 2 and "does not fit" in res.output and "decode_head" in res.output


def test_named_model_from_cache(cli, synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    res = cli("predict", "x.jpg", "--model", "quickstart")
    assert res.exit_code == 2 and "segcli train recipes/quickstart.yaml" in res.output


def test_predict_named_segvit(cli, synth_root, tmp_path, monkeypatch):
    """`segcli predict IMG --model segvit` once a (tiny) SegViT checkpoint sits in the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEGCLI_CACHE", str(cache))
    work = tmp_path / "segvit"
    overrides = tiny_overrides(synth_root, **{"train.max_iters": 1, "train.eval_interval": 1})
    assert cli("train", REPO / "recipes" / "tiny" / "segvit.yaml", "--work-dir", work, *overrides).exit_code == 0
    cache.mkdir()
    (cache / "segvit.pt").write_bytes((work / "best.pt").read_bytes())
    image = next((synth_root / "images" / "val").iterdir())
    res = cli("predict", image, "--model", "segvit", "--out", tmp_path / "pred")
    assert res.exit_code == 0, res.output
    label = cv2.imread(str(tmp_path / "pred" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
    assert label is not None and label.shape == (64, 64) and label.max() < 8
    # two inputs with the same name in different folders (and one given twice): nothing is overwritten
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(image.read_bytes())
    res = cli("predict", tmp_path / "a" / "x.png", tmp_path / "b", tmp_path / "a" / "x.png", "--model", "segvit",
              "--out", tmp_path / "same")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "same").glob("*.png") if "_color" not in p.name) == ["a_x.png", "b_x.png"]


def test_a_bad_validation_mask_keeps_the_trained_weights(cli, tmp_path):
    """The evaluation after training meets a mask with an unknown class id: exit 2, one line naming
    the file, and last.pt written (the training is not lost)."""
    root = tmp_path / "folder"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(2):
            mask = np.zeros((40, 56), np.uint8)
            mask[20:] = 1
            if split == "val" and i == 1:
                mask[:4, :4] = 7  # 3 classes: 7 is no class id
            cv2.imwrite(str(root / "images" / split / f"x{i}.png"), np.full((40, 56, 3), 90 * mask[..., None], np.uint8))
            cv2.imwrite(str(root / "masks" / split / f"x{i}.png"), mask)
    (root / "classes.txt").write_text("a\nb\nc\n")
    work = tmp_path / "run"
    res = cli("train", SETR, "--work-dir", work, *tiny_overrides(root, **{"data.type": "folder", "train.max_iters": 1}))
    assert res.exit_code == 2
    assert "x1.png" in res.output and "last.pt" in res.output and "Traceback" not in res.output
    assert (work / "last.pt").is_file()

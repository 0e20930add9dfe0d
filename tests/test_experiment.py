"""The published experiment: the ``published:`` recipe section, and how a run differs from it."""
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, overrides_dict

from segcli import api
from segcli.build import build_datasets, build_model
from segcli.data import build_train_loader
from segcli.engine.trainer import run_training
from segcli.errors import SegcliError
from segcli.recipe import load_recipe, recipe_from_dict
from segcli.workflows.experiment import compare_to_published, weights_name

MODEL = """
model:
  backbone: {type: vit, name: vit_tiny_patch16_224, img_size: 64, out_indices: [3, 5]}
  decode_head: {type: setr, in_index: -1}
data: {type: synthetic, batch_size: 16, crop_size: [64, 64]}
"""

PUBLISHED = """
published:
  numbers: {"mIoU": 51.3, "mIoU (ms)": 52.1, "GFLOPs": 637}
  source: "thesis table 4.1"
  official_config: "zbwxp/SegVit configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py"
  gpus: 8
  batch_per_gpu: 2
  precision: fp32
  pretrained: "vit_large_p16_384_20220308-d4efb41d.pth"
  differences: {"train.grad_clip": "the thesis trains without clipping"}
"""


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_published_section_is_typed(tmp_path):
    recipe = load_recipe(_write(tmp_path / "r.yaml", MODEL + PUBLISHED))
    published = recipe.published
    assert published.numbers == {"mIoU": 51.3, "mIoU (ms)": 52.1, "GFLOPs": 637.0}
    assert all(isinstance(v, float) for v in published.numbers.values())
    assert published.global_batch == 16
    assert published.precision == "fp32"
    assert published.differences == {"train.grad_clip": "the thesis trains without clipping"}
    assert recipe_from_dict(recipe.to_dict()) == recipe  # the embedded form round-trips
    assert load_recipe(_write(tmp_path / "none.yaml", MODEL)).published is None


@pytest.mark.parametrize("override, message", [
    ("published.gpu=8", "did you mean 'gpus'"),
    ("published.gpus=0", "gpus: must be >= 1"),
    ("published.batch_per_gpu=0", "batch_per_gpu: must be >= 1"),
    ("published.precision=fp64", "choose one of"),
    ("published.numbers={mIoU: high}", "numbers.mIoU: expected a number"),
    ("published.numbers={}", "at least one"),
    ("published.differences={train.grad_clip: 3}", "differences.train.grad_clip"),
    ("published.numbers=51.3", "expected a mapping"),
])
def test_published_section_is_validated(tmp_path, override, message):
    path = _write(tmp_path / "r.yaml", MODEL + PUBLISHED)
    with pytest.raises(SegcliError, match=message):
        load_recipe(path, [override])


def test_published_keys_must_be_written(tmp_path):
    text = MODEL + PUBLISHED.replace("  pretrained: \"vit_large_p16_384_20220308-d4efb41d.pth\"\n", "")
    with pytest.raises(SegcliError, match="missing required key") as err:
        load_recipe(_write(tmp_path / "r.yaml", text))
    assert "published.pretrained" in str(err.value)


def test_published_is_not_inherited_through_base(tmp_path):
    """Each recipe names its own experiment: a child of a recipe with a number claims none of its own
    (a base's published block merged into a child would claim the base's number for another run)."""
    _write(tmp_path / "parent.yaml", MODEL + PUBLISHED)
    child = load_recipe(_write(tmp_path / "child.yaml", "_base_: parent.yaml\ntrain: {max_iters: 20}\n"))
    assert child.published is None
    assert child.data.batch_size == 16  # everything else is inherited
    restated = load_recipe(_write(tmp_path / "restated.yaml", "_base_: parent.yaml\n" + PUBLISHED.replace("51.3", "50.0")))
    assert restated.published.numbers["mIoU"] == 50.0
    assert restated.published.gpus == 8


# --------------------------------------------------------------------------- the differences


def _recipe(tmp_path, published_overrides=(), overrides=(), name="r.yaml", weights=None):
    """MODEL + PUBLISHED with ``overrides`` applied; ``weights`` (a file created in tmp_path) as the
    backbone's pretrained file."""
    text = MODEL + PUBLISHED
    if weights is not None:
        (tmp_path / weights).write_bytes(b"")
        text = text.replace("out_indices: [3, 5]}", f"out_indices: [3, 5], pretrained: '{tmp_path / weights}'}}")
    return load_recipe(_write(tmp_path / name, text), list(published_overrides) + list(overrides))


def _matching(tmp_path, *overrides):
    """The PUBLISHED experiment as run: 8 GPUs x 2, fp32 (train.amp off), the named weights present."""
    return _recipe(tmp_path, ["train.amp='off'", *overrides], weights="vit_large_p16_384_20220308-d4efb41d.pth")


def test_a_run_of_the_published_experiment_has_no_differences(tmp_path):
    check = compare_to_published(_matching(tmp_path), world_size=8, device="cuda")
    assert check.differences == () and check.matches
    summary = check.summary()
    for part in ("thesis table 4.1", "mIoU 51.3", "mIoU (ms) 52.1", "GFLOPs 637", "8 GPUs x 2", "fp32",
                 "segvit_vit-l_jax_640x640_160k_ade20k.py"):
        assert part in summary, part
    # accumulation on fewer GPUs keeps the global batch and the per-GPU batch; the line says how
    check = compare_to_published(_matching(tmp_path, "train.accum_steps=2"), world_size=4, device="cuda")
    assert len(check.differences) == 1 and not check.matches
    assert "per-GPU batch 2 as published" in check.differences[0] and "same 16 samples" in check.differences[0]


def test_global_and_per_gpu_batch_lines(tmp_path):
    check = compare_to_published(_matching(tmp_path, "data.batch_size=8"), world_size=1, device="cuda")
    assert check.differences == (
        "global batch 8 (data.batch_size) instead of 16 (8 GPUs x 2)",
        "per-GPU batch 8 on each of 1 GPU instead of 2 on each of 8")
    one_gpu = compare_to_published(_matching(tmp_path), world_size=1, device="cuda").differences
    assert one_gpu == ("per-GPU batch 16 on each of 1 GPU instead of 2 on each of 8; --set train.accum_steps=8 "
                       "keeps the global batch with 2 per GPU",)
    accumulated = compare_to_published(_matching(tmp_path, "train.accum_steps=4"), world_size=1).differences
    assert accumulated == ("per-GPU batch 4 x 4 accumulated micro-batches (train.accum_steps) on each of 1 GPU "
                           "instead of 2 on each of 8: the optimizer step still sees the global batch of 16; "
                           "--set train.accum_steps=8 keeps the global batch with 2 per GPU",)
    uneven = compare_to_published(_matching(tmp_path), world_size=3).differences
    assert uneven == ("per-GPU batch: data.batch_size 16 does not split over 3 GPUs x train.accum_steps 1; "
                      "train refuses it",)


def test_pretrained_lines(tmp_path):
    missing = compare_to_published(_recipe(tmp_path, ["train.amp='off'"]), world_size=8).differences
    assert missing == ("pretrained weights missing: model.backbone.pretrained is null; the published run started "
                       "from vit_large_p16_384_20220308-d4efb41d.pth",)
    other = _recipe(tmp_path, ["train.amp='off'"], weights="vit_large_patch16_384.augreg_in21k_ft_in1k.safetensors")
    (line,) = compare_to_published(other, world_size=8).differences
    assert line.startswith("pretrained weights ") and "are not the published ones: vit_large_p16_384_20220308" in line
    gone = _matching(tmp_path)
    Path(gone.model.backbone.cfg.pretrained).unlink()
    (line,) = compare_to_published(gone, world_size=8).differences
    assert line.startswith("pretrained weights missing: ") and "does not exist" in line
    scratch = _matching(tmp_path, "published.pretrained=null")
    (line,) = compare_to_published(scratch, world_size=8).differences
    assert line.startswith("the published run trained the backbone from scratch; this run starts from")


@pytest.mark.parametrize("published, local, same", [
    ("vit_large_p16_384_20220308-d4efb41d.pth", "/w/vit_large_p16_384_20220308-d4efb41d.pth", True),
    ("https://download.openmmlab.com/x/vit_large_p16_384_20220308-d4efb41d.pth?v=1",
     "weights/vit_large_p16_384_20220308.safetensors", True),  # another format, no download hash
    ("timm:vit_large_patch16_384.augreg_in21k_ft_in1k", "p/vit_large_patch16_384.augreg_in21k_ft_in1k.safetensors",
     True),
    ("timm:vit_large_patch16_384.augreg_in21k_ft_in1k", "p/vit_large_patch16_384.augreg_in1k.safetensors", False),
    ("vit_large_p16_384_20220308-d4efb41d.pth", "p/vit_base_p16_384_20220308-d4efb41d.pth", False),
])
def test_weights_names_compare_files_urls_and_timm_names(published, local, same):
    assert (weights_name(published) == weights_name(local)) is same


def test_override_and_precision_lines(tmp_path):
    overrides = ["train.max_iters=100", "data.root=/data/ade", "train.eval_interval=50", "data.batch_size=16",
                 "test.mode=whole"]
    recipe = _matching(tmp_path, *overrides)
    check = compare_to_published(recipe, overrides, world_size=8, device="cuda")
    # where the data lives and how often the run evaluates change nothing; the batch line judges the batch
    assert check.differences == ("override --set train.max_iters=100", "override --set test.mode=whole")
    auto = _recipe(tmp_path, weights="vit_large_p16_384_20220308-d4efb41d.pth")  # train.amp: auto
    assert compare_to_published(auto, world_size=8, device="cuda").differences == (
        "precision bf16 (train.amp auto on cuda) instead of fp32",)
    assert compare_to_published(auto, world_size=8, device="cpu").differences == ()  # auto is fp32 on CPU
    fp16 = _recipe(tmp_path, ["train.amp=fp16", "published.precision=bf16"], weights="vit_large_p16_384_20220308-d4efb41d.pth")
    assert compare_to_published(fp16, world_size=8).differences == (
        "precision fp16 (train.amp fp16 on cuda) instead of bf16",)


def test_a_recipe_without_published_claims_nothing(tmp_path):
    check = compare_to_published(load_recipe(_write(tmp_path / "r.yaml", MODEL)), ["train.max_iters=3"])
    assert check.published is None and check.differences == () and not check.matches


# --------------------------------------------------------------------------- train: the event, accumulation

SETR = REPO / "recipes" / "tiny" / "setr.yaml"
SMALL = {"model.backbone.depth": 2, "model.backbone.out_indices": "[1]", "model.backbone.embed_dim": 48,
         "model.backbone.num_heads": 2, "model.decode_head.channels": 16}  # seconds on a shared CPU


def _small(synth_root, **extra):
    return overrides_dict(synth_root, **{**SMALL, **extra})

TINY_PUBLISHED = """
published:
  numbers: {"mIoU": 12.5}
  source: "a tiny table"
  official_config: null
  gpus: 1
  batch_per_gpu: 2
  precision: fp32
  pretrained: null
"""


def _tiny_recipe(tmp_path, synth_root, published=True):
    """tiny/setr.yaml shrunk to seconds in the file itself (no --set), naming a published experiment
    that a 1-process CPU run of it matches."""
    settings = dict(pair.split("=", 1) for pair in _small(synth_root, **{"train.max_iters": 1,
                                                                        "train.eval_interval": 1}))
    body = {}
    for key, value in settings.items():
        *parents, last = key.split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    text = f"_base_: {SETR}\n" + yaml.safe_dump(body) + (TINY_PUBLISHED if published else "")
    return _write(tmp_path / "tiny_published.yaml", text)


def test_train_reports_the_differences_before_the_first_iteration(synth_root, tmp_path):
    path = _tiny_recipe(tmp_path, synth_root)
    events = []
    api.train(path, work_dir=tmp_path / "run", overrides=["model.decode_head.channels=8", "data.num_workers=0"],
              device="cpu", callback=lambda event, info: events.append((event, info)))
    names = [event for event, _ in events]
    assert names.index("start") < names.index("experiment") < names.index("step")
    info = dict(events)["experiment"]
    assert info["differences"] == ["override --set model.decode_head.channels=8"] and not info["matches"]
    assert "a tiny table: mIoU 12.5" in info["published"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"iter": 0, **info}  # recorded in the run's metrics before the first log record
    events.clear()
    api.train(path, work_dir=tmp_path / "same", device="cpu", callback=lambda event, info: events.append((event, info)))
    assert dict(events)["experiment"]["matches"] and dict(events)["experiment"]["differences"] == []


def test_a_recipe_without_published_has_no_experiment_event(synth_root, tmp_path):
    events = []
    api.train(_tiny_recipe(tmp_path, synth_root, published=False), work_dir=tmp_path / "run", device="cpu",
              callback=lambda event, info: events.append(event))
    assert "experiment" not in events and "step" in events


def _forward_inputs(recipe, work_dir, steps):
    """The images each forward pass of training saw in the first ``steps`` optimizer steps."""
    train_set, val_set = build_datasets(recipe)
    model = build_model(recipe, num_classes=train_set.num_classes)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))

    def stop(event, info):
        if event == "step" and info["iter"] == steps:
            raise KeyboardInterrupt

    Path(work_dir).mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, model, train_set, val_set, work_dir, {}, torch.device("cpu"), callback=stop)
    return seen


def test_accumulation_keeps_the_global_batch(synth_root, tmp_path):
    """data.batch_size is the samples of one optimizer step: accumulating 2 steps splits it into two
    micro-batches of half the size (it used to draw 2 whole batches, doubling the global batch), and
    they are the very samples, with the same augmentation, that one step of batch_size sees."""
    base = _small(synth_root, **{"data.batch_size": 4, "train.max_iters": 10, "train.eval_interval": 10})
    whole = _forward_inputs(load_recipe(SETR, base), tmp_path / "whole", steps=2)
    split = _forward_inputs(load_recipe(SETR, base + ["train.accum_steps=2"]), tmp_path / "split", steps=2)
    assert [images.shape[0] for images in whole] == [4, 4]
    assert [images.shape[0] for images in split] == [2, 2, 2, 2]  # samples per optimizer step == batch_size
    for step in range(2):
        assert torch.equal(torch.cat(split[2 * step:2 * step + 2]), whole[step])


def test_a_global_batch_that_does_not_split_is_refused(synth_root, tmp_path):
    recipe = load_recipe(SETR, _small(synth_root, **{"data.batch_size": 3, "train.accum_steps": 2}))
    with pytest.raises(SegcliError, match="data.batch_size 3 .* train.accum_steps 2") as err:
        api.train(recipe, work_dir=tmp_path / "run", device="cpu")
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_resume_with_accumulation_is_exact(synth_root, tmp_path):
    recipe = load_recipe(SETR, _small(synth_root, **{"data.batch_size": 4, "train.accum_steps": 2,
                                                             "train.max_iters": 4, "train.eval_interval": 4}))
    full, part = tmp_path / "full", tmp_path / "part"
    api.train(recipe, work_dir=full, device="cpu")

    def stop_at_2(event, info):  # a real Ctrl-C: the trainer stops at the next iteration boundary
        if event == "step" and info["iter"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        api.train(recipe, work_dir=part, device="cpu", callback=stop_at_2)
    api.train(recipe, work_dir=part, device="cpu", resume=True)
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)


def test_loader_micro_batches_resume_at_an_optimizer_step(synth_root):
    dataset = build_datasets(load_recipe(SETR, _small(synth_root)))[0]
    fresh = build_train_loader(dataset, batch_size=4, num_workers=0, seed=0, accum_steps=2)
    micro = [next(fresh)["index"] for _ in range(6)]
    assert fresh.iteration == 3
    resumed = build_train_loader(dataset, batch_size=4, num_workers=0, seed=0, accum_steps=2, start_iter=2)
    assert [next(resumed)["index"].tolist() for _ in range(2)] == [m.tolist() for m in micro[4:6]]
    ranks = [build_train_loader(dataset, batch_size=4, num_workers=0, seed=0, rank=r, world_size=2, accum_steps=2)
             for r in range(2)]
    step0 = [next(ranks[r])["index"] for r in range(2) for _ in range(2)]  # rank 0's two, then rank 1's
    assert torch.equal(torch.cat(step0), torch.cat(micro[:2]))


# --------------------------------------------------------------------------- the CLI


def test_cli_train_prints_each_difference_or_that_it_is_the_experiment(cli, synth_root, tmp_path):
    path = _tiny_recipe(tmp_path, synth_root)
    res = cli("train", path, "--work-dir", tmp_path / "a", "--set", "model.decode_head.channels=8")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("published experiment: a tiny table: mIoU 12.5"))
    assert lines[header + 1] == "  differs: override --set model.decode_head.channels=8"
    assert header < next(i for i, line in enumerate(lines) if line.startswith("iter 1/1"))  # before the first step
    res = cli("train", path, "--work-dir", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert "this run is the published experiment: a tiny table: mIoU 12.5" in res.output and "differs:" not in res.output


def test_cli_recipe_show_marks_the_differences_and_stays_a_recipe(cli, synth_root, tmp_path):
    path = _tiny_recipe(tmp_path, synth_root)
    res = cli("recipe", "show", path)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("# published experiment: a tiny table: mIoU 12.5")
    assert lines[1] == "# a run on 1 GPU (--gpus N for more), cuda differs from it:"
    assert lines[2] == "#   differs: precision bf16 (train.amp auto on cuda) instead of fp32"
    assert yaml.safe_load(res.output) == yaml.safe_load(api.resolved_recipe_yaml(path))  # comments only
    res = cli("recipe", "show", path, "--gpus", "2", "--set", "train.amp='off'")
    assert res.exit_code == 0, res.output
    assert "#   differs: per-GPU batch 1 on each of 2 GPUs instead of 2 on each of 1" in res.output.splitlines()
    assert "precision" not in res.output.split("model:")[0]
    bf16 = _write(tmp_path / "bf16.yaml", path.read_text().replace("precision: fp32", "precision: bf16"))
    res = cli("recipe", "show", bf16)
    assert "# a run on 1 GPU (--gpus N for more), cuda is the published experiment" in res.output.splitlines()
    res = cli("recipe", "show", SETR)
    assert res.exit_code == 0 and not res.output.startswith("#")  # no published experiment, no marks

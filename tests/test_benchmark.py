"""``segcli benchmark``: the JSON it prints, the ratios' consistency and its errors (never timings)."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, setr_tiny_by_hand
from segcli import api
from segcli.errors import SegcliError

SEGVIT = REPO / "recipes" / "tiny" / "segvit.yaml"
SETR = REPO / "recipes" / "tiny" / "setr.yaml"
TINY = ["--set", "model.backbone.img_size=64", "--set", "data.crop_size=[64,64]"]
METRICS = ("latency_median_s", "latency_min_s", "throughput_ips", "peak_memory_mib", "gflops", "params_m")


def run_json(cli, *args):
    res = cli("benchmark", *args, "--json", "--repeats", "2", "--threads", "1", *TINY)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_json_schema_and_ratios_to_the_first_model(cli):
    out = run_json(cli, SEGVIT, SETR, "--shape", "64", "48", "--batch", "2")
    assert {"device", "threads", "batch", "mode", "repeats", "warmup", "compile", "backbone_only", "load_average",
            "models"} <= set(out)
    assert (out["device"], out["batch"], out["repeats"], out["threads"], out["mode"]) == ("cpu", 2, 2, 1, "whole")
    assert [row["name"] for row in out["models"]] == ["segvit", "setr"]
    first = out["models"][0]
    for row in out["models"]:
        assert row["source"] == "recipe" and row["shape"] == [64, 48]
        assert row["latency_min_s"] <= row["latency_median_s"]
        assert row["throughput_ips"] == pytest.approx(2 / row["latency_median_s"])
        assert row["first_call_s"] > 0
        assert set(row["ratio"]) == set(METRICS)
        for key in METRICS:
            if row[key] is None or not first[key]:
                assert row["ratio"][key] is None
            else:
                assert row["ratio"][key] == pytest.approx(row[key] / first[key])
    assert all(value in (1.0, None) for value in first["ratio"].values())
    setr = setr_tiny_by_hand(64, 48, img_size=64)  # one image's count, whatever the batch
    assert out["models"][1]["gflops"] == pytest.approx(setr.flops / 1e9, rel=1e-9)
    assert out["models"][1]["params_m"] == pytest.approx(setr.params / 1e6, rel=1e-9)


def test_backbone_only_counts_the_encoder_alone(cli):
    encoder = run_json(cli, SETR, "--shape", "64", "64", "--backbone-only")["models"][0]
    setr = setr_tiny_by_hand(64, 64, img_size=64)
    head_params = 2 * 192 + 192 * 128 + 2 * 128 + 128 * 8 + 8  # SETR-naive: LN, conv, BN, classifier
    assert encoder["gflops"] == pytest.approx(setr.backbone_flops / 1e9, rel=1e-9)
    assert encoder["params_m"] == pytest.approx((setr.params - head_params) / 1e6, rel=1e-9)


def test_slide_mode_and_a_checkpoint(cli, setr_run):
    _, result = setr_run
    out = run_json(cli, result.best, SETR, "--shape", "96", "80", "--mode", "slide")
    assert [row["source"] for row in out["models"]] == ["checkpoint", "recipe"]
    assert out["mode"] == "slide"
    # 64x64 windows every 42 px (2/3 of the crop), the last flush: 2 x 2 windows, each counted whole
    trained = setr_tiny_by_hand(64, 64, patch=16, img_size=64)  # the checkpoint's recipe (tiny_overrides)
    recipe = setr_tiny_by_hand(64, 64, img_size=64)  # tiny/setr.yaml with TINY: patch 8
    checkpoint_row, recipe_row = out["models"]
    assert checkpoint_row["gflops"] == pytest.approx(4 * trained.flops / 1e9, rel=1e-9)
    assert checkpoint_row["params_m"] == pytest.approx(trained.params / 1e6, rel=1e-9)
    assert recipe_row["gflops"] == pytest.approx(4 * recipe.flops / 1e9, rel=1e-9)


def test_progress_callback_counts_every_call():
    calls = []
    api.benchmark([SEGVIT, SETR], shape=(32, 32), repeats=2, warmup=1, overrides=TINY[1::2],
                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 8) for i in range(1, 9)]  # 2 models x (1 warm-up + 2 timed + 1 memory call)


@pytest.mark.parametrize("args, message", [
    (["nope.yaml"], "no such file"),
    ([str(SEGVIT), "--warmup", "0"], "--warmup"),
    ([str(SEGVIT), "--mode", "tiled"], "unknown mode"),
    ([str(SEGVIT), "--shape", "0", "64"], "not an image size"),
])
def test_bad_input_is_one_line_and_exit_2(cli, args, message):
    res = cli("benchmark", *args)
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_compile_without_a_compiler_is_a_user_error(monkeypatch):
    monkeypatch.setattr("segcli.engine.inference.shutil.which", lambda name: None)
    with pytest.raises(SegcliError, match="C\\+\\+ compiler"):
        api.benchmark([SEGVIT], shape=(32, 32), compile=True, device="cpu", overrides=TINY[1::2])


def test_allocator_setting_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from segcli import allocator

    monkeypatch.setenv(allocator.OPT_OUT_ENV, "system")
    assert allocator.retain_freed_memory() is False  # opted out: glibc's defaults stay
    monkeypatch.delenv(allocator.OPT_OUT_ENV)
    applied = allocator.retain_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    allocator.release_freed_memory()  # never raises, glibc or not


def test_peak_memory_is_measured_after_freed_memory_is_retained():
    """With freed blocks kept in the heap, a later call's peak must still show (free pages handed back first)."""
    import platform

    from segcli import allocator

    if platform.system() != "Linux":
        pytest.skip("the CPU peak reads /proc/self/status")
    allocator.retain_freed_memory()
    result = api.benchmark([SEGVIT], shape=(256, 256), repeats=1, warmup=1, overrides=TINY[1::2])
    assert result["models"][0]["peak_memory_mib"] > 1  # scores of 256² alone are several MiB

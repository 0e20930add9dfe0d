"""The official DToP optimizer groups and lr schedule on the ``dtop`` parity fixture (run by hand,
never by CI).

For each config of zbwxp/Dynamic-Token-Pruning ``config/prune/``, MMEngine 0.7's
``build_optim_wrapper`` (``DefaultOptimWrapperConstructor`` with the config's ``paramwise_cfg``)
on the reduced DToP model of ``tests/fixtures/official/dtop.json`` gives every parameter's lr and
weight decay; the config's ``param_scheduler`` (``LinearLR`` warmup, then ``PolyLR`` from its
``begin``), stepped once per iteration as ``ParamSchedulerHook`` does, gives the lr at iterations
0, 1, 1499, 1500, mid and last; ``optim_wrapper.clip_grad`` (what MMEngine clips with; the
configs' ``optimizer_config`` is an mmcv 1.x key MMEngine never reads) is recorded. Writes
``dtop_optim.json``.

MMSegmentation 1.x world only::

    PYTHONPATH=/tmp/ref/mm1 /tmp/ref/v1/bin/python tools/make_dtop_optim_fixture.py \
        --dtop-repo /tmp/ref/Dynamic-Token-Pruning [--out tests/fixtures/official]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_parity_fixtures as fixtures  # noqa: E402  (helpers: quiet loggers, versions)
import official_env  # noqa: E402

CONFIGS = ["BASE_segvit_ade20k.py", "BASE_segvit_ade20k_large.py", "BASE_segvit_cocostuff10k.py",
           "BASE_segvit_pc.py", "prune_segvit_ade20k.py", "prune_segvit_ade20k_large.py",
           "prune_segvit_cocostuff10k.py", "prune_segvit_pc.py"]
PROBES = {"backbone": "backbone.layers.0.attn.attn.in_proj_weight", "head": "decode_head.q.weight"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtop-repo", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official")
    args = parser.parse_args()
    torch.set_num_threads(1)
    official_env.import_mmseg()
    sys.path.insert(0, str(args.dtop_repo))
    import mmseg_custom  # noqa: F401  (registers ViT_prune, PruneHead, EncoderDecoderPrune, ATMLoss)
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    fixtures.quiet_loggers()
    info = json.loads((args.out / "dtop.json").read_text())
    model = MODELS.build(Config(dict(model=copy.deepcopy(info["config"]))).model)
    names = {id(p): n for n, p in model.named_parameters()}
    configs = {}
    for config_name in CONFIGS:
        cfg = Config.fromfile(str(args.dtop_repo / "config" / "prune" / config_name))
        wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
        groups = {}
        for group in wrapper.optimizer.param_groups:
            for param in group["params"]:
                groups[names[id(param)]] = [group["lr"], group["weight_decay"]]
        index = {key: next(i for i, g in enumerate(wrapper.optimizer.param_groups)
                           if any(names[id(p)] == probe for p in g["params"])) for key, probe in PROBES.items()}
        schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in copy.deepcopy(cfg.param_scheduler)]
        max_iters = cfg.train_cfg["max_iters"]
        wanted = {0, 1, 1499, 1500, max_iters // 2, max_iters - 1}
        lr_at = {}
        for it in range(max_iters):  # the lr iteration `it` trains with: after `it` scheduler steps
            if it in wanted:
                lr_at[str(it)] = {k: wrapper.optimizer.param_groups[i]["lr"] for k, i in index.items()}
            for scheduler in schedulers:
                scheduler.step()
        configs[config_name] = dict(
            optim_wrapper=dict(cfg.optim_wrapper), param_scheduler=list(cfg.param_scheduler),
            optimizer_config=dict(cfg.get("optimizer_config", {})), max_iters=max_iters,
            clip_grad=cfg.optim_wrapper.get("clip_grad"), params=groups, lr_probes=PROBES, lr_at=lr_at)
        print(config_name, lr_at)
    summary = {
        "made_by": "tools/make_dtop_optim_fixture.py",
        "official_repo": info["official_repo"],
        "official_code": ["mmengine 0.7.0 optim/optimizer/default_constructor.py DefaultOptimWrapperConstructor",
                          "mmengine 0.7.0 optim/scheduler/lr_scheduler.py LinearLR, PolyLR"],
        "model": "the dtop fixture's reduced model (dtop.json config)",
        "configs": configs,
        "versions": fixtures.versions(),
    }
    (args.out / "dtop_optim.json").write_text(json.dumps(fixtures.jsonable(summary), indent=1) + "\n")


if __name__ == "__main__":
    main()

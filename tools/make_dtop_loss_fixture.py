"""The official DToP@Finetune losses on the ``dtop`` parity fixture (run by hand, never by CI).

zbwxp/Dynamic-Token-Pruning trains with pruning active: ``ViT_prune.forward`` runs every
``PruneHead`` between blocks with ``inference=True``, which grades tokens, hands the mask-logit
``canvas`` to the next head and leaves the head's outputs in ``head.results``; each head's loss then
reads those (``PruneHead.forward(inference=False)`` + ``loss_decode``, i.e. ``ATMLoss``). This
script rebuilds the reduced model of ``tests/fixtures/official/dtop.json`` with the official code,
loads ``dtop.pth``, switches every dropout and drop-path off (so train mode is deterministic),
and writes ``dtop_loss.pt``: the fixture's input, a label map with ignore pixels, which tokens
exited at each stage, every head's official loss terms, and the gradient of the decode head's
loss on each head's input projection (it reaches the auxiliary heads through the mask logits that
exited tokens carry on the canvas).

MMSegmentation 1.x world only; run with the reference interpreter and ``--mmseg1-path`` first on
``PYTHONPATH``::

    PYTHONPATH=/tmp/ref/mm1 /tmp/ref/v1/bin/python tools/make_dtop_loss_fixture.py \
        --dtop-repo /tmp/ref/Dynamic-Token-Pruning [--out tests/fixtures/official]

``PruneHead.loss_by_feat`` is not called because its ``accuracy`` compares the head's prediction
at ``img_size`` (64) with labels at the input size (128), which fails for this reduced model; the
loss terms are exactly what ``loss_by_feat`` computes before it.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_parity_fixtures as fixtures  # noqa: E402  (helpers: quiet loggers, official imports)
import official_env  # noqa: E402

SEED = fixtures.SEED + 60


def labels_for(prediction: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Labels [1, H, W] from the official prediction: 10% of the pixels set to another class and a
    band of ignore (255) rows at the top, so that losses see hits, misses and ignore pixels."""
    gen = torch.Generator().manual_seed(seed)
    labels = prediction.clone().long()
    flip = torch.rand(labels.shape, generator=gen) < 0.1
    labels[flip] = (labels[flip] + torch.randint(1, num_classes, (int(flip.sum()),), generator=gen)) % num_classes
    labels[:, :12] = 255
    return labels


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
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    fixtures.quiet_loggers()
    info = json.loads((args.out / "dtop.json").read_text())
    io = torch.load(args.out / "dtop_io.pt", weights_only=True)
    model = MODELS.build(Config(dict(model=copy.deepcopy(info["config"]))).model)
    # dtop.pth is this project's own fixture (an MMEngine checkpoint whose message_hub pickles
    # HistoryBuffer objects), so the full unpickler is used on it
    checkpoint = torch.load(args.out / "dtop.pth", map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model.train()
    for module in model.modules():  # deterministic train mode: no dropout, no drop-path
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):  # the decoder layers' query self-attention
            module.dropout = 0.0
    x = io["input"]
    labels = labels_for(io["seg_pred"].view(1, *x.shape[-2:]), info["num_classes"], SEED)

    stages = []

    def record(module, args_, kwargs, output):
        if kwargs.get("inference", False):
            stages.append(output[0].detach().clone())  # batch_idx: exited at this or an earlier stage

    heads = [*model.auxiliary_head, model.decode_head]
    hooks = [h.register_forward_hook(record, with_kwargs=True) for h in heads]
    features = model.extract_feat(x)  # every head runs (and grades) between blocks, as in training
    for h in hooks:
        h.remove()
    losses, decode_terms = {}, []
    for name, head in [("aux_0", model.auxiliary_head[0]), ("aux_1", model.auxiliary_head[1]),
                       ("decode", model.decode_head)]:
        outputs = head.forward(features)  # inference=False: the results of the pass above, full canvas
        terms = head.loss_decode(outputs, labels, ignore_index=head.ignore_index)
        losses.update({f"{name}.{k}": v.detach().clone() for k, v in terms.items()})
        if name == "decode":
            decode_terms = list(terms.values())
    # the decode loss reaches the auxiliary heads through the mask logits that exited tokens carry
    model.zero_grad()
    sum(decode_terms).backward()
    grads = {f"grad.{name}.input_proj.weight": head.input_proj.weight.grad.detach().clone()
             for name, head in [("aux_0", model.auxiliary_head[0]), ("aux_1", model.auxiliary_head[1]),
                                ("decode", model.decode_head)]}
    exited = [s[0].to(torch.uint8) for s in stages[:2]]
    for m in range(2):  # deterministic train mode grades as the fixture's inference did
        assert torch.equal(exited[m], io[f"stage{m}.exited"][0]), f"stage {m} exits differ from dtop_io.pt"
    payload = {"input": x, "labels": labels.to(torch.uint8), "stage0.exited": exited[0], "stage1.exited": exited[1],
               **{f"loss.{k}": v for k, v in losses.items()}, **grads}
    torch.save(payload, args.out / "dtop_loss.pt")
    summary = {
        "made_by": "tools/make_dtop_loss_fixture.py",
        "official_repo": info["official_repo"],
        "official_code": ["mmseg_custom/backbone/vit_prune.py ViT_prune.forward (canvas from head to head)",
                          "mmseg_custom/decode_heads/prune_head.py PruneHead.forward (results, full canvas)",
                          "mmseg_custom/loss/atm_loss.py ATMLoss, mmseg_custom/loss/criterion.py SetCriterion"],
        "model": "the dtop fixture (dtop.json / dtop.pth), train mode with dropout and drop-path set to 0",
        "labels": "the official prediction with 10% of pixels moved to another class, rows 0-11 ignore (255)",
        "exited_tokens": {"stage0": int(exited[0].sum()), "stage1": int(exited[1].sum()),
                          "of": int(exited[0].numel())},
        "losses": {k: float(v) for k, v in losses.items()},
        "gradients": {k: f"d(sum of the decode losses)/d {k[5:]}, norm {float(v.norm()):.6g}" for k, v in grads.items()},
        "versions": fixtures.versions(),
    }
    (args.out / "dtop_loss.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["losses"], indent=1), summary["exited_tokens"])


if __name__ == "__main__":
    main()

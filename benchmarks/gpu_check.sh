#!/usr/bin/env bash
# GPU smoke check (not run by CI: it needs a CUDA machine). Exits non-zero at the first failure.
#
#   1. a few training iterations of tiny SETR, SegViT, NRD and DToP with train.amp=auto (bf16 on CUDA);
#   2. a one-process torchrun (DDP over NCCL) of tiny SegViT, then `segcli eval` of its checkpoint;
#   3. `segcli benchmark` of SegViT ViT-B at 512x512 and NRD R50 at 1024x2048, batch 1 and 8, eager
#      and with --compile (random weights; the table goes to stdout, JSON copies to $OUT_DIR).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: a fresh temporary folder)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT_DIR="${1:-$(mktemp -d -t segcli-gpu-XXXXXX)}"
mkdir -p "$OUT_DIR"
DATA="$OUT_DIR/synthetic"
SEGCLI=(python -m segcli)

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'gpu_check: FAILED: %s\n' "$*" >&2; exit 1; }

step "CUDA"
python - <<'PY' || fail "CUDA is not available to torch"
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
assert torch.distributed.is_nccl_available(), "this torch has no NCCL"
PY

# tiny data and schedules (what tests/conftest.py tiny_overrides sets), on the GPU
COMMON=(--set "data.root=$DATA" --set data.synthetic_size=64 --set data.synthetic_train=16 --set data.synthetic_val=4
        --set "data.crop_size=[64,64]" --set data.batch_size=4 --set data.num_workers=0
        --set train.max_iters=6 --set train.warmup_iters=1 --set train.eval_interval=6 --set train.log_interval=2
        --set train.amp=auto)
VIT=(--set model.backbone.img_size=64)

train() {  # name recipe [extra --set ...]
  local name="$1" recipe="$2"; shift 2
  step "train $name ($recipe, amp auto = bf16)"
  "${SEGCLI[@]}" train "$recipe" --work-dir "$OUT_DIR/$name" --device cuda "${COMMON[@]}" "$@" \
    || fail "training $name"
  [[ -f "$OUT_DIR/$name/last.pt" ]] || fail "$name wrote no last.pt"
  python - "$OUT_DIR/$name/metrics.jsonl" <<'PY' || fail "$name: loss is not finite"
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
losses = [v for row in rows for k, v in row.items() if k.startswith("loss") and isinstance(v, (int, float))]
assert losses, "no loss logged"
assert all(math.isfinite(v) for v in losses), losses
print("losses:", ", ".join(f"{v:.3f}" for v in losses[:6]))
PY
}

train setr recipes/tiny/setr.yaml "${VIT[@]}" --set model.backbone.patch_size=16
train segvit recipes/tiny/segvit.yaml "${VIT[@]}" --set model.backbone.patch_size=16
train nrd recipes/tiny/nrd.yaml
train dtop recipes/tiny/dtop.yaml "${VIT[@]}" --set model.type=dtop --set "model.options={p0: 0.95}"

step "torchrun, 1 process (NCCL)"
torchrun --standalone --nproc_per_node=1 -m segcli train recipes/tiny/segvit.yaml --work-dir "$OUT_DIR/ddp" \
  "${COMMON[@]}" "${VIT[@]}" --set model.backbone.patch_size=16 || fail "torchrun training"
[[ -f "$OUT_DIR/ddp/last.pt" ]] || fail "torchrun wrote no last.pt"

step "eval"
"${SEGCLI[@]}" eval "$OUT_DIR/ddp/last.pt" --device cuda --json > "$OUT_DIR/eval.json" || fail "eval"
python -c "import json,sys; m=json.load(open(sys.argv[1])); assert 0 <= m['mIoU'] <= 100; print('mIoU', m['mIoU'])" \
  "$OUT_DIR/eval.json" || fail "eval output"

bench() {  # tag recipe H W batch [--compile]
  local tag="$1" recipe="$2" h="$3" w="$4" batch="$5"; shift 5
  step "benchmark $tag: $recipe ${h}x${w} batch $batch $*"
  "${SEGCLI[@]}" benchmark "$recipe" --shape "$h" "$w" --batch "$batch" --device cuda --repeats 10 --warmup 3 "$@" \
    || fail "benchmark $tag"
  "${SEGCLI[@]}" benchmark "$recipe" --shape "$h" "$w" --batch "$batch" --device cuda --repeats 10 --warmup 3 "$@" \
    --json > "$OUT_DIR/bench_${tag}.json" || fail "benchmark $tag --json"
}

for batch in 1 8; do
  bench "segvit_b${batch}" recipes/segvit_vit_b_ade20k.yaml 512 512 "$batch"
  bench "segvit_b${batch}_compile" recipes/segvit_vit_b_ade20k.yaml 512 512 "$batch" --compile
  bench "nrd_b${batch}" recipes/nrd_r50_cityscapes.yaml 1024 2048 "$batch"
  bench "nrd_b${batch}_compile" recipes/nrd_r50_cityscapes.yaml 1024 2048 "$batch" --compile
done

step "all GPU checks passed ($OUT_DIR)"

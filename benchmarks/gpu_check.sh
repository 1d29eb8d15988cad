#!/usr/bin/env bash
# One prepared device check (issue 17 item 4; docs/gpu-check.md), from the repo root:
#   bash benchmarks/gpu_check.sh                 # one GPU: pure tests, ~1B Llama eager + compile=blocks
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh # CPU, tiny model, eager only, no pytest step
# No pip install, no network: PYTHONPATH=src and the `stdlib` byte-level data source.
# Everything printed also goes to $OUT/gpu_check.log when OUT is set, with each run's plan and config.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
# compile and extension caches stay in the scratch folder, never in the user's home
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TORCH_EXTENSIONS_DIR="$WORK/ext" MPLCONFIGDIR="$WORK/mpl"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

if [ -n "${GPU_CHECK_DRY:-}" ]; then
    # compile=blocks is left out here: inductor's C++ build takes minutes on a small shared CPU
    MODES=(none)
    TRAIN_TIMEOUT=120
    SETS=(model.dim=64 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 model.max_seq_len=64
        training.seq_len=64 training.steps=4 training.micro_batch=2 training.global_batch=4
        training.warmup_steps=1 training.dtype=fp32 training.device=cpu data.max_tokens=200000)
else
    # shuffled, so that a drift of the machine (clocks, heat) does not always favour the same mode
    read -r -a MODES <<<"$(printf '%s\n' none blocks | shuf | tr '\n' ' ')"
    TRAIN_TIMEOUT=200
    # ~1.0B parameters (dim 2048, 22 layers, GQA 16/8, byte vocab 256); micro_batch 8 at seq 2048 is
    # ~40 GiB predicted (16 B/param of fp32 state + bf16 activations), far under 139 GiB: no recompute
    SETS=(model.dim=2048 model.n_layers=22 model.n_heads=16 model.n_kv_heads=8 model.max_seq_len=2048
        training.seq_len=2048 training.steps=30 training.warmup_steps=5 training.micro_batch=8 training.global_batch=16
        training.dtype=bf16 training.device=cuda training.activation_checkpointing=none data.max_tokens=2000000)
fi
# no checkpoints (16 GB each at 1B), no eval, one sample token: the check times training steps only
SETS+=(training.eval_interval=0 checkpoint.interval=0 checkpoint.resume=never logging.log_interval=1
    logging.sample_tokens=1)
ARGS=()
for s in "${SETS[@]}"; do ARGS+=(--set "$s"); done

echo "== gpu_check $(date -u +%FT%TZ) dry=${GPU_CHECK_DRY:-0} work=$WORK"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

if [ -z "${GPU_CHECK_DRY:-}" ]; then
    echo "== pure tests"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m pure tests 2>&1 | tail -n 15
    rc=${PIPESTATUS[0]}
    case $rc in
        0) echo "pure tests: PASS" ;;
        124) echo "pure tests: TIMEOUT (150 s)" ;;
        *) echo "pure tests: FAIL (rc=$rc)" ;;
    esac
fi

echo "== run order: ${MODES[*]}"
for mode in "${MODES[@]}"; do
    label=compile-$mode
    run="$WORK/run-$mode"
    echo "== train $label"
    "$PY" -m meshtrain plan --config configs/default.toml --nproc 1 --json "${ARGS[@]}" \
        --set training.compile="$mode" >"$WORK/plan-$mode.json" || echo "plan failed for $label"
    start=$(date +%s)
    timeout "$TRAIN_TIMEOUT" "$PY" -m meshtrain train --config configs/default.toml --nproc 1 --run-dir "$run" \
        "${ARGS[@]}" --set training.compile="$mode" >"$WORK/train-$mode.log" 2>&1
    rc=$?
    echo "train $label: rc=$rc ($(($(date +%s) - start)) s wall)"
    [ "$rc" -ne 0 ] && tail -n 20 "$WORK/train-$mode.log"
    "$PY" benchmarks/gpu_check_report.py --label "$label" --run-dir "$run" --plan "$WORK/plan-$mode.json"
    if [ -n "${OUT:-}" ]; then
        cp "$WORK/plan-$mode.json" "$OUT/$label.plan.json" 2>/dev/null
        cp "$run/config.toml" "$OUT/$label.config.toml" 2>/dev/null
        cp "$run/metrics.jsonl" "$OUT/$label.metrics.jsonl" 2>/dev/null
        cp "$WORK/train-$mode.log" "$OUT/$label.train.log" 2>/dev/null
    fi
done
if [ "${#MODES[@]}" -eq 2 ]; then
    "$PY" benchmarks/gpu_check_report.py --label "compile-blocks/compile-none" --run-dir "$WORK/run-blocks" \
        --baseline "$WORK/run-none"
fi
rm -rf "$WORK"
echo "== gpu_check done $(date -u +%FT%TZ)"

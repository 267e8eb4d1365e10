#!/usr/bin/env bash
# The full experiment of docs/RESULTS.md. Two processes (one per dataset), each
# MLP then CNN; single-threaded XLA so the two share a 2-core machine cleanly.
# Run from the repository root:  bash docs/results/run_full.sh [both|mlp|cnn]
# then the supplement:            bash docs/results/run_full.sh long
set -u
PY=${PY:-python}
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
NORMS="bn gbn-superquantile gbn-mean_abs gbn-median_abs gbn-half_range l1bn none selu"
ALPHAS="0.1 0.3 0.5 0.7 0.9"
COMMON="--seeds 3 --batch-size 128 --optimizer sgd --lr 0.1 --lr-sweep --sweep-seeds 1 --no-progress"
WHAT=${1:-both}
run() {  # dataset
  if [ "$WHAT" != cnn ]; then
    $PY examples/train.py --dataset $1 --model mlp --steps 500 --eval-every 25 \
      --norm $NORMS --alpha $ALPHAS $COMMON --out docs/results/$1_mlp
  fi
  if [ "$WHAT" != mlp ]; then
    $PY examples/train.py --dataset $1 --model cnn --width 16 --steps 100 --eval-every 20 \
      --norm $NORMS --alpha $ALPHAS $COMMON --out docs/results/$1_cnn
  fi
}
[ "$WHAT" = long ] || run mnist1d > docs/results/log_mnist1d_$WHAT.txt 2>&1 &
[ "$WHAT" = long ] || run digits > docs/results/log_digits_$WHAT.txt 2>&1 &
wait
# Supplement (run after the above): a 3x longer CNN budget on mnist1d, lr 0.1 only.
if [ "$WHAT" = long ]; then
  $PY examples/train.py --dataset mnist1d --model cnn --width 16 --steps 300 --eval-every 20 \
    --norm $NORMS --alpha $ALPHAS --seeds 3 --batch-size 128 --optimizer sgd --lr 0.1 \
    --no-progress --out docs/results/mnist1d_cnn_300steps > docs/results/log_mnist1d_cnn_300steps.txt 2>&1
fi

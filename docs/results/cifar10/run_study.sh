#!/usr/bin/env bash
# The CIFAR-10 study of docs/RESULTS.md (issue 15), in chunks that each fit a
# session. Run from the repository root:
#
#   bash docs/results/cifar10/run_study.sh DATA list       # every chunk, done or not
#   bash docs/results/cifar10/run_study.sh DATA next [N]   # the next N pending chunks (1)
#   bash docs/results/cifar10/run_study.sh DATA CHUNK      # one chunk by name
#   bash docs/results/cifar10/run_study.sh DATA summarize  # summaries and curves
#
# DATA: CIFAR-10 as examples/train.py --data-dir takes it (the .tar.xz archive,
# an unpacked image folder, or the python batches); decoded once into
# --cache-dir (default ~/.cache/gbn_jax).
#
# A chunk is one (model, norm, seed) of the main comparison or one norm of the
# lr sweep. Its rows are appended to docs/results/cifar10_<model>/results.csv
# when it finishes (nothing is written for a chunk killed midway: rerun it),
# then docs/results/cifar10_<model>/chunks/<chunk>.done marks it done; its log
# is beside the marker. Commit results.csv and the markers after each chunk.
#
# Setup (same for every norm): SGD with momentum 0.9, batch 128, constant
# lr 0.1, no weight decay, augmentation (random crop after 4-pixel padding,
# horizontal flip), seeds 0-2 (init, data order, augmentation; identical
# across norms), test accuracy every 195 steps (half an epoch of 390 steps).
# Budgets: plain CNN 10 epochs, ResNet-20 $RESNET_EPOCHS epochs (default 5:
# what fits, see docs/RESULTS.md), lr sweep 3 epochs on the plain CNN with
# seed 0 at lr in {0.03, 0.1, 0.3, 1, 3}. With gbn_jax.linen's
# recompute_batch_stats present, every evaluation of the main comparison is
# also made with precise statistics over $PRECISE training batches (default
# 20); PRECISE=0 turns that off.
#
# Environment: PY (default .venv/bin/python), OUT (default docs/results),
# RESNET_EPOCHS, PRECISE, and
# APPROX_ALPHA: the α of gbn-superquantile-approx, to be set to the best α of
# the exact runs before the approx chunks (they refuse to run without it).
set -eu
PY=${PY:-.venv/bin/python}
RESNET_EPOCHS=${RESNET_EPOCHS:-5}
PRECISE=${PRECISE:-20}
APPROX_ALPHA=${APPROX_ALPHA:-}
OUT=${OUT:-docs/results}
DATA=${1:?usage: run_study.sh DATA list|next [N]|summarize|CHUNK}
WHAT=${2:-list}

NORMS="bn sq0.5 sq0.7 sq0.9 l1bn none"  # approx: after APPROX_ALPHA is chosen

chunks() {  # in running order: seed 0 of everything first
  for seed in 0 1 2; do
    for model in cnn resnet20; do
      for n in $NORMS; do echo "$model-$n-s$seed"; done
    done
  done
  for n in $NORMS; do echo "sweep-$n"; done
  for seed in 0 1 2; do
    for model in cnn resnet20; do echo "$model-approx-s$seed"; done
  done
  echo "sweep-approx"
}

norm_args() {  # short norm name -> --norm/--alpha arguments
  case $1 in
    sq*) echo "--norm gbn-superquantile --alpha ${1#sq}" ;;
    approx)
      if [ -z "$APPROX_ALPHA" ]; then
        echo "set APPROX_ALPHA to the best alpha of gbn-superquantile" >&2
        return 1
      fi
      echo "--norm gbn-superquantile-approx --alpha $APPROX_ALPHA" ;;
    *) echo "--norm $1" ;;
  esac
}

dir_of() {  # chunk -> output directory
  case $1 in
    sweep-*) echo "$OUT/cifar10_cnn_lr_sweep" ;;
    cnn-*) echo "$OUT/cifar10_cnn" ;;
    resnet20-*) echo "$OUT/cifar10_resnet20" ;;
  esac
}

precise_args() {
  if [ "$PRECISE" -gt 0 ] && $PY -c \
      "import gbn_jax.linen as l; l.recompute_batch_stats" 2>/dev/null; then
    echo "--precise-stats $PRECISE"
  fi
}

run_chunk() {
  local chunk=$1 dir norm args
  dir=$(dir_of "$chunk")
  [ -n "$dir" ] || { echo "unknown chunk $chunk (see: list)" >&2; return 1; }
  mkdir -p "$dir/chunks"
  if [ -e "$dir/chunks/$chunk.done" ]; then
    echo "$chunk: already done" >&2
    return 0
  fi
  args="--dataset cifar10 --data-dir $DATA --batch-size 128 --optimizer sgd
    --lr-schedule constant --eval-every 195 --no-progress --append"
  case $chunk in
    sweep-*)
      norm=${chunk#sweep-}
      args="$args --model cnn --epochs 3 --seeds 1 --lr 0.1 --lr-sweep
        --lr-grid 0.03 0.1 0.3 1 3" ;;
    *)
      local model=${chunk%%-*} seed=${chunk##*-s} epochs=10
      norm=${chunk#"$model"-}; norm=${norm%-s*}
      [ "$model" = resnet20 ] && epochs=$RESNET_EPOCHS
      args="$args --model $model --epochs $epochs --lr 0.1 --seeds 1
        --first-seed $seed $(precise_args)" ;;
  esac
  args="$args $(norm_args "$norm")"
  echo "$(date -u +%FT%TZ) $chunk: $PY examples/train.py" $args --out "$dir" >&2
  # shellcheck disable=SC2086
  nice -n 10 "$PY" examples/train.py $args --out "$dir" \
    > "$dir/chunks/$chunk.log" 2>&1
  date -u +%FT%TZ > "$dir/chunks/$chunk.done"
  echo "$(date -u +%FT%TZ) $chunk: done" >&2
}

case $WHAT in
  list)
    for c in $(chunks); do
      if [ -e "$(dir_of "$c")/chunks/$c.done" ]; then echo "done    $c"
      else echo "pending $c"; fi
    done ;;
  next)
    left=${3:-1}
    for c in $(chunks); do
      [ "$left" -gt 0 ] || break
      [ -e "$(dir_of "$c")/chunks/$c.done" ] && continue
      run_chunk "$c"
      left=$((left - 1))
    done ;;
  summarize)
    for d in cifar10_cnn cifar10_resnet20 cifar10_cnn_lr_sweep; do
      [ -e "$OUT/$d/results.csv" ] || continue
      "$PY" examples/train.py --summarize-only --lr 0.1 --out "$OUT/$d" \
        > /dev/null
      echo "$OUT/$d/summary.md, curves.png"
    done ;;
  *) run_chunk "$WHAT" ;;
esac

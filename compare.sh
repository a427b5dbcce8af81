#!/usr/bin/env bash
# The README's comparison in one command. Every run trains on the same tokens (30 optimiser steps of
# 8 x 256 tokens of the Python docs, depths 4/8 drawn per batch, lr warmup 10) and is evaluated on the
# same windows (48 per split) at depths 1, 4, 8, 16, with paired 95% bootstrap intervals against the
# static diagonals (eval.py). Resumable: a finished run is skipped, a killed one resumes from its last
# checkpoint, and evaluated runs keep their per-window losses, so a second call does only what is missing.
#
#   bash compare.sh          # 6 trained variants x seeds 0, 1, 2 -> results/compare  (~2 h on 2 CPU cores)
#   bash compare.sh ranks    # controller and static at rank 8 and 64, seed 0 -> results/ranks  (~30 min)
#
# The tables are rewritten after every run, so results/ holds whatever has finished.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
RUNS=runs/compare
EVAL=(--depths 1,4,8,16 --windows 48 --against static)

run() {  # run NAME TRAIN-ARGS...: train runs/compare/NAME unless it has finished
    local out=$RUNS/$1
    shift
    [ -f "$out/trained" ] && return
    local resume=()
    [ -f "$out/checkpoint.safetensors" ] && resume=(--resume)
    mkdir -p "$out"
    echo "== $out $*"
    "$PY" train.py --out "$out" --steps 30 --warmup 10 --eval-interval 30 --eval-windows 8 --no-final-eval \
        "$@" "${resume[@]}" 2>&1 | tee -a "$out/train.log"
    touch "$out/trained"
}

table() {  # table OUT NAMES...: evaluate the finished runs among NAMES into OUT
    local out=$1 runs=()
    shift
    for name in "$@"; do [ -f "$RUNS/$name/trained" ] && runs+=("$RUNS/$name"); done
    "$PY" eval.py --run "${runs[@]}" "${EVAL[@]}" --out "$out" > /dev/null
}

declare -A VARIANT=(
    [static]="--variant static"
    [controller-causal]="--variant controller --pool causal"
    [controller-mean]="--variant controller --pool mean"
    [gate+norm]="--variant none"
    [controller-causal-nogate]="--variant controller --no-gate"
    [controller-causal-t+2]="--variant controller --label-offset 2"
)
ORDER=(static controller-causal controller-mean gate+norm controller-causal-nogate controller-causal-t+2)

if [ "${1:-}" = ranks ]; then
    names=()
    for r in 8 64; do
        for v in static controller-causal; do
            run "$v-r$r-s0" ${VARIANT[$v]} --rank $r --seed 0
            names+=("$v-r$r-s0")
            table results/ranks static-s{0,1,2} controller-causal-s{0,1,2} "${names[@]}"
        done
    done
else
    names=()
    for seed in 0 1 2; do
        for v in "${ORDER[@]}"; do
            run "$v-s$seed" ${VARIANT[$v]} --seed $seed
            names+=("$v-s$seed")
            table results/compare "${names[@]}"
        done
    done
fi

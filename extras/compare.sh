#!/usr/bin/env bash
# The README's comparison in one command. Every run trains on the same tokens (30 optimiser steps of
# 8 x 256 tokens of the Python docs, depths 4/8 drawn per batch, lr warmup 10) and is evaluated on the
# same windows (48 per split) at depths 1, 4, 8, 16, with paired 95% bootstrap intervals against the
# static diagonals, the causal controller and the pruned baseline (eval.py --against). Resumable: a
# finished run is skipped, a killed one resumes from its last checkpoint, and evaluated runs keep their
# per-window losses, so a second call does only what is missing.
#
#   bash extras/compare.sh          # 6 trained variants x seeds 0, 1, 2 -> results/compare  (~2 h on 2 CPU cores)
#   bash extras/compare.sh ranks    # controller and static at rank 8 and 64, seed 0 -> results/ranks  (~30 min more)
#   bash extras/compare.sh exits    # every step decodable, two ways, seed 0, and their exit heads -> results/exits
#   bash extras/compare.sh qwen     # controller and static on Qwen2.5-Coder-0.5B, seeds 0, 1 -> results/qwen
#                                   # (bash setup.sh --qwen first)
#   bash extras/compare.sh coda     # coda adapters (extras/coda_lora.py) against the controller alone and wider
#                                   # controllers of as many parameters, seeds 0, 1, 2 -> results/coda
#   bash extras/compare.sh coda-qwen  # the same on Qwen2.5-Coder-0.5B, seeds 0, 1 -> results/coda-qwen
#
# The tables are rewritten after every run, so results/ holds whatever has finished.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: runs/ and results/ are there
PY=${PYTHON:-.venv/bin/python}
RUNS=runs/compare
EVAL=(--depths 1,4,8,16 --windows 48)
MODEL=()  # the default model and layer split

flags() {  # the train.py flags of a variant
    case $1 in
        static) echo --variant static ;;
        controller-causal) echo --variant controller --pool causal ;;
        controller-mean) echo --variant controller --pool mean ;;
        gate+norm) echo --variant none ;;
        controller-causal-nogate) echo --variant controller --no-gate ;;
        controller-causal-t+2) echo --variant controller --label-offset 2 ;;
        every-uniform) echo --variant controller --depths 1,2,3,4,5,6,7,8 ;;  # a depth drawn per batch
        every-readout) echo --variant controller --depths 8 --readout every ;;  # the mean over all 8 readouts
        controller-causal+coda_lora-*) echo --variant controller --adapters "extras.coda_lora:${1#*coda_lora-}" ;;
        controller-causal-s*) echo --variant controller --style "${1#controller-causal-s}" ;;  # a wider controller
    esac
}

run() {  # run VARIANT SEED [RANK]: train runs/compare/VARIANT[-rRANK]-sSEED unless it has finished
    local variant=$1 seed=$2 rank=${3:-32} out=$RUNS/$1${3:+-r$3}-s$2 resume=
    [ -f "$out/trained" ] && return
    [ -f "$out/checkpoint.safetensors" ] && resume=--resume
    mkdir -p "$RUNS"
    echo "== $out"
    # tee -i: a Ctrl-C reaches train.py, which saves the step it is in, but not the log writer. The log lies
    # beside the run: train.py writes only into a new or empty folder, or a run of its own.
    "$PY" train.py --out "$out" --steps 30 --warmup 10 --eval-interval 30 --eval-windows 8 \
        $(flags "$variant") --seed "$seed" --rank "$rank" "${MODEL[@]}" $resume 2>&1 | tee -ia "$out.log"
    touch "$out/trained"
}

table() {  # table OUT AGAINST NAMES...: the finished runs among NAMES into OUT, against those of AGAINST there are
    local out=$1 wanted=$2 against= runs=() name a
    shift 2
    for name in "$@"; do
        if [ -f "$RUNS/$name/trained" ]; then runs+=("$RUNS/$name"); fi
    done
    for a in ${wanted//,/ }; do
        for name in pruned full "${runs[@]}"; do
            if [ "${name%-s[0-9]*}" = "$a" ] || [ "${name%-s[0-9]*}" = "$RUNS/$a" ]; then against+=,$a; break; fi
        done
    done
    "$PY" eval.py --run "${runs[@]}" "${EVAL[@]}" --against "${against#,}" --out "$out" > /dev/null
}

if [ "${1:-}" = qwen ]; then  # the paper's family: 5 + [12] + 5 of Qwen2.5's 24 layers, its 17 of 36's share
    RUNS=runs/qwen
    MODEL=(--model cache/Qwen2.5-Coder-0.5B-Instruct --prelude 5 --recurrent 12 --coda 5)
    EVAL=(--depths 1,4,8 --windows 32)
    names=()
    for seed in 0 1; do
        for v in static controller-causal; do
            run $v $seed
            names+=($v-s$seed)
            table results/qwen static,pruned "${names[@]}"
        done
    done
elif [ "${1:-}" = coda ]; then  # the sweep (seed 0) that chose all seven projections, then the comparison
    names=()
    for v in controller-causal controller-causal+coda_lora-r8 controller-causal+coda_lora-r8_attn \
             controller-causal+coda_lora-r32 controller-causal+coda_lora-r32_attn; do
        run $v 0
        names+=($v-s0)
        table results/coda-sweep controller-causal,pruned "${names[@]}"
    done
    # s268 and s520: as many trainable parameters as r_c = 8 and 32 (1.66M and 3.62M against 1.02M); s520 at seed 0
    # only, for time, after neither wider controller beat the controller alone there
    names=()
    for seed in 0 1 2; do
        for v in controller-causal controller-causal+coda_lora-r8 controller-causal+coda_lora-r32 \
                 controller-causal-s268 $([ "$seed" = 0 ] && echo controller-causal-s520); do
            run $v $seed
            names+=($v-s$seed)
            table results/coda controller-causal,controller-causal-s268,pruned "${names[@]}"
        done
    done
elif [ "${1:-}" = coda-qwen ]; then  # the best adapters of the sweep above (r_c = 8) against the controller alone
    RUNS=runs/qwen
    MODEL=(--model cache/Qwen2.5-Coder-0.5B-Instruct --prelude 5 --recurrent 12 --coda 5)
    EVAL=(--depths 1,4,8,16 --windows 32)
    names=()
    for seed in 0 1; do
        for v in controller-causal controller-causal+coda_lora-r8; do
            run $v $seed
            names+=($v-s$seed)
            table results/coda-qwen controller-causal,pruned "${names[@]}"
        done
    done
elif [ "${1:-}" = exits ]; then  # which way of training makes every step decodable, and what an exit wins
    for v in every-uniform every-readout; do
        run $v 0
        [ -f "$RUNS/$v-s0/exit.safetensors" ] || "$PY" extras/exits.py head --run "$RUNS/$v-s0"
        "$PY" extras/exits.py eval --run "$RUNS/$v-s0" --depth 8 --windows 16 \
            --latent-diff 0.02,0.03,0.05,0.07,0.1,0.15 --out "results/exits/$v" > /dev/null
    done
elif [ "${1:-}" = ranks ]; then  # beside rank 32 (seeds 0, 1, 2 of the main comparison)
    names=()
    for v in static controller-causal; do
        for seed in 0 1 2; do run $v $seed; names+=($v-s$seed); done
    done
    for r in 8 64; do
        for v in static controller-causal; do
            run $v 0 $r
            names+=($v-r$r-s0)
            table results/ranks static,controller-causal "${names[@]}"
        done
    done
    table results/ranks static-r8,static,static-r64,controller-causal "${names[@]}"  # each rank's static too
else
    names=()
    for seed in 0 1 2; do
        for v in static controller-causal controller-causal-t+2 controller-mean gate+norm controller-causal-nogate; do
            run $v $seed
            names+=($v-s$seed)
            table results/compare static,controller-causal,pruned "${names[@]}"
        done
    done
fi

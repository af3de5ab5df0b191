#!/usr/bin/env bash
# Speed against context depth, microllm vs llama.cpp, alternating runs; then the chart.
#
# usage: LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin bench/depth.sh MODEL.gguf [ROUNDS]
# env:   THREADS (2), DEPTHS (0,512,1024,2048,4096): depths of the tgNGEN test,
#        PP_DEPTHS (0): depths of the ppNPROMPT test (empty: none), NGEN (64), NPROMPT (512),
#        REPS (3), KV (f16), MICROLLM (target/release/microllm), OUT (bench/results/depth-<model>)
#
# Each round runs, per depth, llama-bench then `microllm bench` with the same -p/-n/-d/-t/-r,
# so machine noise hits both alike; every run's JSON is kept in $OUT, and bench/plot_depth.py reduces the
# rounds to medians, prints the table and writes docs/performance-depth.svg.
set -euo pipefail
model=${1:?usage: LLAMA_CPP_BIN=... bench/depth.sh MODEL.gguf [ROUNDS]}
rounds=${2:-3}
: "${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to the bin folder of llama.cpp}"
threads=${THREADS:-2}
depths=${DEPTHS:-0,512,1024,2048,4096}
ngen=${NGEN:-64}
nprompt=${NPROMPT:-512}
reps=${REPS:-3}
pp_depths=${PP_DEPTHS-0}
kv=${KV:-f16}
microllm=${MICROLLM:-target/release/microllm}
name=$(basename "$model" .gguf)
out=${OUT:-bench/results/depth-$name}
mkdir -p "$out"
export LD_LIBRARY_PATH="$LLAMA_CPP_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Alternate per depth, not per sweep, so that each llama.cpp/microllm pair runs close in time.
for r in $(seq 1 "$rounds"); do
    for d in ${depths//,/ }; do
        echo "round $r/$rounds: tg$ngen @ d$d" >&2
        "$LLAMA_CPP_BIN/llama-bench" -m "$model" -t "$threads" -p 0 -n "$ngen" -d "$d" \
            -r "$reps" -ctk "$kv" -ctv "$kv" -o json > "$out/llama-tg-d$d-$r.json"
        "$microllm" bench -m "$model" -t "$threads" -p 0 -n "$ngen" -d "$d" -r "$reps" \
            --kv-type "$kv" --json > "$out/microllm-tg-d$d-$r.json"
    done
    for d in ${pp_depths//,/ }; do
        echo "round $r/$rounds: pp$nprompt @ d$d" >&2
        "$LLAMA_CPP_BIN/llama-bench" -m "$model" -t "$threads" -p "$nprompt" -n 0 -d "$d" \
            -r "$reps" -ctk "$kv" -ctv "$kv" -o json > "$out/llama-pp-d$d-$r.json"
        "$microllm" bench -m "$model" -t "$threads" -p "$nprompt" -n 0 -d "$d" -r "$reps" \
            --kv-type "$kv" --json > "$out/microllm-pp-d$d-$r.json"
    done
done
python3 "$(dirname "$0")/plot_depth.py" --microllm "$out"/microllm-*.json \
    --llama "$out"/llama-*.json -o "${SVG:-docs/performance-depth.svg}" --table \
    --title "$name, $threads threads, medians of $rounds alternating rounds"

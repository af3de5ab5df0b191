#!/usr/bin/env bash
# Speed against context depth, microllm vs llama.cpp, alternating runs; then the chart.
#
# usage: LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin bench/depth.sh MODEL.gguf [ROUNDS]
# env:   THREADS (2), DEPTHS (0,512,1024,2048,4096): depths of the tgNGEN test,
#        PP_DEPTHS (0): depths of the ppNPROMPT test (empty: none), NGEN (64), NPROMPT (512),
#        REPS (3), KV (f16), MICROLLM (target/release/microllm), OUT (bench/results/depth-<model>)
#
# Each round runs llama-bench, then `microllm bench`, with the same -p/-n/-d/-t/-r, so machine
# noise hits both alike; every run's JSON is kept in $OUT, and bench/plot_depth.py reduces the
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
for r in $(seq 1 "$rounds"); do
    echo "round $r/$rounds: llama-bench" >&2
    "$LLAMA_CPP_BIN/llama-bench" -m "$model" -t "$threads" -p 0 -n "$ngen" -d "$depths" \
        -r "$reps" -ctk "$kv" -ctv "$kv" -o json > "$out/llama-tg-$r.json"
    if [ -n "$pp_depths" ]; then
        "$LLAMA_CPP_BIN/llama-bench" -m "$model" -t "$threads" -p "$nprompt" -n 0 \
            -d "$pp_depths" -r "$reps" -ctk "$kv" -ctv "$kv" -o json > "$out/llama-pp-$r.json"
    fi
    echo "round $r/$rounds: microllm bench" >&2
    "$microllm" bench -m "$model" -t "$threads" -p 0 -n "$ngen" -d "$depths" -r "$reps" \
        --kv-type "$kv" --json > "$out/microllm-tg-$r.json"
    if [ -n "$pp_depths" ]; then
        "$microllm" bench -m "$model" -t "$threads" -p "$nprompt" -n 0 -d "$pp_depths" \
            -r "$reps" --kv-type "$kv" --json > "$out/microllm-pp-$r.json"
    fi
done
python3 "$(dirname "$0")/plot_depth.py" --microllm "$out"/microllm-*.json \
    --llama "$out"/llama-*.json -o "${SVG:-docs/performance-depth.svg}" --table \
    --title "$name, $threads threads, medians of $rounds alternating rounds"

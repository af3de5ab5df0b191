#!/usr/bin/env python3
"""Side-by-side speed of microllm and llama.cpp on the same model, alternating runs.

usage: LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin bench/compare.py MODEL.gguf [--rounds 3]
       [--threads 2] [-p 512] [-n 128] [-d 0] [--microllm target/release/microllm]

Each round runs `llama-bench` then `microllm bench` with the same -p/-n/-d/-t and repetitions,
so machine noise hits both alike; the medians over rounds and their ratio are printed, as
Markdown, plus the raw JSON into bench/results-<model>.json. `../shared/tools/llamacpp.sh`
builds llama.cpp and prints its bin folder.
"""
import argparse, json, os, statistics, subprocess, sys


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-d", type=int, default=0)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--microllm", default="target/release/microllm")
    a = ap.parse_args()
    llama_bin = os.environ.get("LLAMA_CPP_BIN")
    if not llama_bin:
        sys.exit("set LLAMA_CPP_BIN to llama.cpp's bin folder (../shared/tools/llamacpp.sh prints it)")
    common = ["-p", str(a.p), "-n", str(a.n), "-t", str(a.threads), "-r", str(a.r)]
    ours, theirs = {}, {}
    for _ in range(a.rounds):
        cmd = [os.path.join(llama_bin, "llama-bench"), "-m", a.model, "-o", "json", *common]
        if a.d:
            cmd += ["-d", str(a.d)]
        for row in run_json(cmd):
            key = ("pp" if row["n_prompt"] else "tg") + str(row["n_prompt"] or row["n_gen"])
            theirs.setdefault(key, []).append(row["avg_ts"])
        cmd = [a.microllm, "bench", "-m", a.model, "--json", *common, "-d", str(a.d)]
        for row in run_json(cmd):
            key = ("pp" if row["n_prompt"] else "tg") + str(row["n_prompt"] or row["n_gen"])
            ours.setdefault(key, []).append(row["avg_ts"])
    name = os.path.basename(a.model)
    print(f"| model | test | depth | threads | llama.cpp t/s | microllm t/s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    results = []
    for key in sorted(ours):
        m, l = statistics.median(ours[key]), statistics.median(theirs.get(key, [float("nan")]))
        print(f"| {name} | {key} | {a.d} | {a.threads} | {l:.1f} | {m:.1f} | {m / l:.2f}x |")
        results.append({"model": name, "test": key, "depth": a.d, "threads": a.threads,
                        "llama_cpp": theirs.get(key), "microllm": ours[key], "ratio": m / l})
    with open(f"bench/results-{name}-d{a.d}.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

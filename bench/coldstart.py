#!/usr/bin/env python3
"""Cold start of `microllm run`: process start to first generated token, warm page cache.

usage: bench/coldstart.py MODEL.gguf [--runs 15] [--microllm target/release/microllm]
       [--prompt "The capital of France is"] [extra `run` flags, e.g. -t 1 --ctx 2048]

Runs `microllm run -m MODEL --temp 0 -n 1 --raw PROMPT --stats` once untimed (to warm the page
cache), then --runs times, and prints the medians of
  ttft_ms   time to first token counted from `main` (what `run --stats` reports),
  wall_ms   the whole process as seen from here (exec, load, first token, exit),
  peak_rss  VmHWM at exit.
"""
import argparse, json, statistics, subprocess, sys, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--microllm", default="target/release/microllm")
    ap.add_argument("--prompt", default="The capital of France is")
    a, extra = ap.parse_known_args()
    cmd = [a.microllm, "run", "-m", a.model, "--temp", "0", "-n", "1", "--raw", a.prompt,
           "--stats", *extra]
    ttft, wall, rss = [], [], []
    for i in range(a.runs + 1):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        dt = (time.perf_counter() - t0) * 1e3
        if out.returncode != 0:
            sys.exit(f"microllm failed:\n{out.stderr}")
        stats = json.loads(out.stderr.strip().splitlines()[-1])
        if i == 0:
            continue  # warms the page cache
        ttft.append(stats["ttft_ms"])
        wall.append(dt)
        rss.append(stats["peak_rss_bytes"] / 2**20)
    med = statistics.median
    print(f"runs={a.runs} prompt_tokens={stats['prompt_tokens']} kv={stats['kv_type']}")
    print(f"ttft_ms  median {med(ttft):.1f}  min {min(ttft):.1f}  max {max(ttft):.1f}")
    print(f"wall_ms  median {med(wall):.1f}  min {min(wall):.1f}  max {max(wall):.1f}")
    print(f"peak_rss median {med(rss):.1f} MiB (model file {stats['model_file_bytes'] / 2**20:.1f} MiB,"
          f" KV {stats['kv_bytes'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

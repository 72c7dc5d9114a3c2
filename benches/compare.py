#!/usr/bin/env python3
"""Runs `kdllm bench` and the PyTorch reference side by side, one config per process, and
prints kdllm's throughput as a ratio of PyTorch's (f32 and bf16).

Optional, not run by CI. Needs a release build and `pip install torch transformers`:
    cargo build --release && python3 benches/compare.py [--configs 1M,5M,20M] [--out DIR]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd):
    print("$", " ".join(map(str, cmd)), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1M,5M,20M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batches", default="1,8,32")
    ap.add_argument("--out", default="runs/bench")
    a = ap.parse_args()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--train-steps", str(a.train_steps), "--new-tokens", str(a.new_tokens), "--gen-batches", a.gen_batches]
    rows = []
    for name in a.configs.split(","):
        k = out / f"kdllm-{name}.json"
        run([ROOT / "target/release/kdllm", "bench", "--configs", name, "--json", k, *common])
        ours = json.loads(k.read_text())
        theirs = {}
        for dtype in ["f32", "bf16"]:
            t = out / f"torch-{name}-{dtype}.json"
            run([sys.executable, ROOT / "benches/torch_bench.py", "--config", name, "--dtype", dtype,
                 "--threads", str(a.threads), "--json", t, *common])
            theirs[dtype] = json.loads(t.read_text())
        rows.append((name, ours, theirs))

    print(f"\nmachine: {rows[0][1]['machine']['threads']} threads, GEMM peak "
          f"{rows[0][1]['machine']['gemm_peak_gflops']:.0f} GFLOP/s; Parquet "
          f"{rows[0][1]['parquet_bytes_per_token']:.1f} B/token at k=20")
    print("| config | kdllm train tok/s | vs torch f32 | vs torch bf16 | kdllm sample tok/s (batch) | vs torch f32 | vs torch bf16 | kdllm train peak MB | torch f32 peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ours, theirs in rows:
        m = ours["models"][0]
        tr = m["train_tokens_per_sec"]
        gen = {b: t for b, t in m["gen_tokens_per_sec"]}
        tg = {d: {b: t for b, t in theirs[d]["gen_tokens_per_sec"]} for d in theirs}
        for b in gen:
            first = b == min(gen)
            train_cells = (f"{tr:.0f} | {tr / theirs['f32']['train_tokens_per_sec']:.2f}x | "
                           f"{tr / theirs['bf16']['train_tokens_per_sec']:.2f}x") if first else " | | "
            peak = f"{m['train_peak_mb']:.0f} | {theirs['f32']['peak_mb']:.0f}" if first else " | "
            print(f"| {name if first else ''} | {train_cells} | {gen[b]:.0f} (b{b}) | "
                  f"{gen[b] / tg['f32'][b]:.2f}x | {gen[b] / tg['bf16'][b]:.2f}x | {peak} |")


if __name__ == "__main__":
    main()

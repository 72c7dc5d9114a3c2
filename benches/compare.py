#!/usr/bin/env python3
"""Runs `kdllm bench` and the PyTorch reference side by side, one config per process, and
prints kdllm's throughput as a ratio of PyTorch's (f32 and bf16). With --gguf, also times that
GGUF model's generation in kdllm and in llama.cpp (benches/llama_cpp_bench.py) and compares them.

Optional, not run by CI. Needs a release build and `pip install torch transformers`
(and `pip install llama-cpp-python==0.3.36` for --gguf):
    cargo build --release && python3 benches/compare.py [--configs 1M,5M,20M|none] [--gguf PATH] [--out DIR]
--skip-run reprints the tables from the JSON files already in --out.
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
    ap.add_argument("--configs", default="1M,5M,20M", help="comma-separated, or `none`")
    ap.add_argument("--gguf", help="also compare this GGUF model's generation with llama.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batches", default="1,8,32")
    ap.add_argument("--gguf-batches", default="1,8,32,64,128", help="batches for the --gguf comparison")
    ap.add_argument("--gguf-train-steps", type=int, default=2)
    ap.add_argument("--gguf-dtypes", default="f32,gguf", help="kdllm --dtype values to sample the GGUF with")
    ap.add_argument("--repeat", type=int, default=3, help="GGUF generation runs per engine; the best of them counts")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--skip-run", action="store_true", help="only print the tables from the JSON files in --out")
    a = ap.parse_args()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--train-steps", str(a.train_steps), "--new-tokens", str(a.new_tokens), "--gen-batches", a.gen_batches]
    configs = [] if a.configs in ("", "none") else a.configs.split(",")
    rows = []
    for name in configs:
        k = out / f"kdllm-{name}.json"
        if not a.skip_run:
            run([ROOT / "target/release/kdllm", "bench", "--configs", name, "--json", k, *common])
        ours = json.loads(k.read_text())
        # kdllm's bf16 training (bf16 GEMMs where the CPU has avx512_bf16), training only.
        kb = out / f"kdllm-{name}-bf16.json"
        if not a.skip_run:
            run([ROOT / "target/release/kdllm", "bench", "--configs", name, "--dtype", "bf16", "--json", kb,
                 "--train-steps", str(a.train_steps), "--new-tokens", "1", "--gen-batches", "1"])
        ours_bf16 = json.loads(kb.read_text()) if kb.exists() else None
        theirs = {}
        for dtype in ["f32", "bf16"]:
            t = out / f"torch-{name}-{dtype}.json"
            if not a.skip_run:
                run([sys.executable, ROOT / "benches/torch_bench.py", "--config", name, "--dtype", dtype,
                     "--threads", str(a.threads), "--json", t, *common])
            theirs[dtype] = json.loads(t.read_text())
        rows.append((name, ours, ours_bf16, theirs))

    dtypes = a.gguf_dtypes.split(",")
    kg = {d: out / f"kdllm-gguf-{d}.json" for d in dtypes}
    lg = out / "llamacpp-gguf.json"
    gguf = None
    if a.gguf and not a.skip_run:
        for i, d in enumerate(dtypes):
            # Training is f32 whatever the sampling dtype: timed once, with the first.
            steps = a.gguf_train_steps if i == 0 else 0
            best_of(a.repeat, kg[d], [ROOT / "target/release/kdllm", "bench", "--configs", "none", "--gguf", a.gguf,
                                      "--dtype", d, "--train-steps", str(steps), "--new-tokens", str(a.new_tokens),
                                      "--gen-batches", a.gguf_batches])
        best_of(a.repeat, lg, [sys.executable, ROOT / "benches/llama_cpp_bench.py", "--gguf", a.gguf,
                               "--threads", str(a.threads), "--new-tokens", str(a.new_tokens),
                               "--gen-batches", a.gguf_batches])
    if a.gguf or (a.skip_run and all(k.exists() for k in kg.values()) and lg.exists()):
        gguf = ({d: json.loads(k.read_text()) for d, k in kg.items()}, json.loads(lg.read_text()))

    first = rows[0][1] if rows else next(iter(gguf[0].values()))
    m = first['machine']
    if 'cpu' in m:
        print(f"\ncpu: {m['cpu']} ({' '.join(m['cpu_flags'])}); kdllm kernels: {m['kernels']}")
    print(f"\nmachine: {first['machine']['threads']} threads, GEMM peak "
          f"{first['machine']['gemm_peak_gflops']:.0f} GFLOP/s; Parquet "
          f"{first['parquet_bytes_per_token']:.1f} B/token at k=20")
    if rows:
        print_torch_table(rows)
    if gguf:
        print_gguf_table(*gguf)


def print_torch_table(rows):
    print("| config | kdllm train tok/s | vs torch f32 | vs torch bf16 | kdllm bf16 train tok/s | vs torch f32 | vs torch bf16 | kdllm sample tok/s (batch) | vs torch f32 | vs torch bf16 | kdllm train peak MB | peak / (state + activations) | torch f32 peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ours, ours_bf16, theirs in rows:
        m = ours["models"][0]
        tr = m["train_tokens_per_sec"]
        gen = {b: t for b, t in m["gen_tokens_per_sec"]}
        tg = {d: {b: t for b, t in theirs[d]["gen_tokens_per_sec"]} for d in theirs}
        for b in gen:
            first = b == min(gen)
            train_cells = (f"{tr:.0f} | {tr / theirs['f32']['train_tokens_per_sec']:.2f}x | "
                           f"{tr / theirs['bf16']['train_tokens_per_sec']:.2f}x") if first else " | | "
            if first and ours_bf16:
                tb = ours_bf16["models"][0]["train_tokens_per_sec"]
                train_cells += (f" | {tb:.0f} | {tb / theirs['f32']['train_tokens_per_sec']:.2f}x | "
                                f"{tb / theirs['bf16']['train_tokens_per_sec']:.2f}x")
            else:
                train_cells += " | | | "
            bound = m["train_state_mb"] + m["train_activations_mb"]
            peak = (f"{m['train_peak_mb']:.0f} | {m['train_peak_mb'] / bound:.2f}x | {theirs['f32']['peak_mb']:.0f}"
                    if first else " | | ")
            print(f"| {name if first else ''} | {train_cells} | {gen[b]:.0f} (b{b}) | "
                  f"{gen[b] / tg['f32'][b]:.2f}x | {gen[b] / tg['bf16'][b]:.2f}x | {peak} |")


def best_of(n, path, cmd):
    """Runs a bench writing JSON to `path` n times; keeps, per batch, the best generation speed."""
    best = None
    for _ in range(n):
        run([*cmd, "--json", path])
        r = json.loads(Path(path).read_text())
        gens = r["models"][-1]["gen_tokens_per_sec"] if "models" in r else r["gen_tokens_per_sec"]
        if best is None:
            best = r
        else:
            keep = best["models"][-1] if "models" in best else best
            keep["gen_tokens_per_sec"] = [[b, max(t, dict(gens)[b])] for b, t in keep["gen_tokens_per_sec"]]
    Path(path).write_text(json.dumps(best, indent=2))


def print_gguf_table(ours, theirs):
    lc = dict(theirs["gen_tokens_per_sec"])
    first = next(iter(ours.values()))["models"][-1]
    print(f"\n{first['name']}: training {first['train_tokens_per_sec']:.0f} tok/s, peak {first['train_peak_mb']:.0f} MB "
          f"(state {first['train_state_mb']:.0f} MB + activations {first['train_activations_mb']:.0f} MB); "
          f"generation, {theirs['threads']} threads, llama-cpp-python {theirs['llama_cpp_python']}, best of runs")
    gens = {d: dict(r["models"][-1]["gen_tokens_per_sec"]) for d, r in ours.items()}
    print("| batch | " + " | ".join(f"kdllm {d} tok/s" for d in gens) + " | llama.cpp tok/s | "
          + " | ".join(f"{d} / llama.cpp" for d in gens) + " |")
    print("|---|" + "---|" * (2 * len(gens) + 1))
    for b in sorted(lc):
        print(f"| {b} | " + " | ".join(f"{g[b]:.0f}" for g in gens.values()) + f" | {lc[b]:.0f} | "
              + " | ".join(f"{g[b] / lc[b]:.2f}x" for g in gens.values()) + " |")
    lb = max(lc, key=lc.get)
    for d, g in gens.items():
        kb = max(g, key=g.get)
        print(f"best {d}: kdllm {g[kb]:.0f} tok/s (batch {kb}) vs llama.cpp {lc[lb]:.0f} tok/s (batch {lb}): "
              f"{g[kb] / lc[lb]:.2f}x")


if __name__ == "__main__":
    main()

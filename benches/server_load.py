#!/usr/bin/env python3
"""kdllm against a plain load client on the same llama-server: does kdllm add a bottleneck?

Starts llama-server (tools/build-llama-server.sh) on a GGUF with --slots parallel slots, then
alternates, --rounds times:
  * `kdllm generate --teacher http://.../v1` (greedy, --logprobs K, --concurrency C) on the
    first --prompts GSM8K test questions as chat prompts;
  * a plain asyncio client (the standard library only: raw HTTP/1.1 keep-alive connections,
    `json.loads` of every answer) replaying kdllm's exact requests: the prompt ids kdllm sent
    (read back from its Parquet), the same n_predict, n_probs, temperature 0 and samplers,
    C at a time.
Greedy decoding makes both write the same tokens, so tokens/s compare like for like. Prints each
round and the ratio of the medians. Needs pyarrow (`pip install pyarrow`).

  python3 benches/server_load.py --server-bin ~/.cache/kdllm/llama-server/bin/llama-server \
      --gguf ~/.cache/kdllm/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.2)
    sys.exit(f"llama-server at {url} did not become healthy")


def write_prompts(path, n):
    gsm8k = os.path.join(ROOT, "..", "shared", "data", "gsm8k", "test.jsonl")
    with open(gsm8k) as f, open(path, "w") as out:
        for i, line in enumerate(f):
            if i == n:
                break
            q = json.loads(line)["question"]
            out.write(json.dumps({"id": f"gsm8k-{i}", "messages": [{"role": "user", "content": q}]}) + "\n")


def run_kdllm(kdllm, url, prompts, out, args):
    cmd = [kdllm, "generate", "--teacher", url + "/v1", "--prompts", prompts, "-o", out,
           "--temperature", "0", "--max-new-tokens", str(args.new_tokens), "--logprobs", str(args.logprobs),
           "--concurrency", str(args.concurrency), "--part-size", "64"]
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    import pyarrow.parquet as pq
    rows = pq.read_table(out).to_pylist() if os.path.isfile(out) else []
    if not rows:
        import glob
        for part in sorted(glob.glob(os.path.join(out, "part-*.parquet"))):
            rows.extend(pq.read_table(part).to_pylist())
    tokens = sum(len(r["completion_token_ids"]) for r in rows)
    return wall, tokens, [r["prompt_token_ids"] for r in rows]


def body(prompt_ids, args):
    # What kdllm sends for greedy sampling (src/engine/llama_server.rs), seed aside.
    return {
        "prompt": prompt_ids, "n_predict": args.new_tokens, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
        "seed": 1, "n_probs": args.logprobs, "logit_bias": [], "min_p": 0.0, "typical_p": 1.0,
        "repeat_penalty": 1.0, "repeat_last_n": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "dry_multiplier": 0.0, "xtc_probability": 0.0, "mirostat": 0, "top_n_sigma": -1.0,
        "dynatemp_range": 0.0, "min_keep": 0, "ignore_eos": False, "samplers": ["top_k", "temperature", "top_p"],
        "post_sampling_probs": False, "return_tokens": True, "cache_prompt": True, "stream": False,
    }


async def plain_client(port, prompts, args):
    queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    tokens = 0

    async def worker():
        nonlocal tokens
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            data = json.dumps(body(p, args)).encode()
            writer.write(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = json.loads(await reader.readexactly(length))
            tokens += len(answer["completion_probabilities"])
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return time.perf_counter() - t, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--kdllm", default=os.path.join(ROOT, "target", "release", "kdllm"))
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--logprobs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.server_bin, "-m", args.gguf, "--port", str(port), "--parallel", str(args.slots),
                               "-c", str(args.slots * 1024), "-t", str(args.threads), "--no-repack"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url)
        tmp = tempfile.mkdtemp()
        prompts = os.path.join(tmp, "prompts.jsonl")
        write_prompts(prompts, args.prompts)
        out = os.path.join(tmp, "out")
        k_rates, p_rates = [], []
        # A warm-up of each, so neither pays for a cold server.
        _, _, prompt_ids = run_kdllm(args.kdllm, url, prompts, out, args)
        asyncio.run(plain_client(port, prompt_ids[:args.concurrency], args))
        for r in range(args.rounds):
            kw, kt, _ = run_kdllm(args.kdllm, url, prompts, out, args)
            pw, pt = asyncio.run(plain_client(port, prompt_ids, args))
            k_rates.append(kt / kw)
            p_rates.append(pt / pw)
            print(f"round {r + 1}: kdllm {kt} tokens in {kw:.2f} s = {kt / kw:.1f} tok/s; "
                  f"plain client {pt} tokens in {pw:.2f} s = {pt / pw:.1f} tok/s", flush=True)
        k, p = statistics.median(k_rates), statistics.median(p_rates)
        print(f"median: kdllm {k:.1f} tok/s, plain client {p:.1f} tok/s, ratio {k / p:.3f} "
              f"({args.slots} slots, concurrency {args.concurrency}, {args.prompts} prompts, "
              f"{args.new_tokens} new tokens, top-{args.logprobs})")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()

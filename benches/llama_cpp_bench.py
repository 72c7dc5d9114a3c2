#!/usr/bin/env python3
"""llama.cpp reference for `kdllm bench --gguf`: generation speed of a GGUF model in llama.cpp.

Optional, not run by CI. Needs llama-cpp-python (builds llama.cpp from source, CPU, ~5-15 min):
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python==0.3.36
    python3 benches/llama_cpp_bench.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--threads 2] [--json out.json]

Same convention as kdllm's gen_speed: for each --gen-batches size B, B random 16-token prompts
(seeded, over the model's vocabulary) are prefilled in one batch, then decoded together with the
low-level API, one token per sequence per llama_decode call (distinct seq_ids), greedy (argmax),
exactly --new-tokens tokens per sequence, never stopping at EOS. Reports aggregate generated
tokens/s with prefill included (context creation excluded). Batch 1 is plain single-stream decode.

llama.cpp's AMX weight buffers (an "extra buffer type", picked by a native build on CPUs that
advertise AMX) crash with SIGSEGV at `ldtilecfg` on the Firecracker VM this was written on, so
they are off unless --amx is given; for Q4_1 on x86 this leaves the ordinary AVX-512 CPU kernels.
"""

import argparse
import json
import time

import llama_cpp
import numpy as np

PROMPT = 16


def gen_speed(model, n_vocab, batch, new_tokens, threads):
    prompts = np.random.default_rng(1).integers(0, n_vocab, (batch, PROMPT))
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = batch * (PROMPT + new_tokens)
    cp.n_batch = max(512, batch * PROMPT)
    cp.n_seq_max = batch
    cp.n_threads = cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    b = llama_cpp.llama_batch_init(batch * PROMPT, 0, batch)

    def step(tokens, pos):
        """Feeds tokens (batch, T) at positions pos.., sequence s as seq_id s; returns next tokens (batch, 1)."""
        t_len = tokens.shape[1]
        b.n_tokens = tokens.size
        for s in range(batch):
            for t in range(t_len):
                i = s * t_len + t
                b.token[i], b.pos[i], b.n_seq_id[i] = int(tokens[s, t]), pos + t, 1
                b.seq_id[i][0], b.logits[i] = s, t == t_len - 1
        if llama_cpp.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(batch, n_vocab))
        return logits.argmax(axis=1)[:, None]

    start = time.perf_counter()
    nxt, generated = step(prompts, 0), 1
    while generated < new_tokens:
        nxt = step(nxt, PROMPT + generated - 1)
        generated += 1
    tok_s = batch * generated / (time.perf_counter() - start)
    llama_cpp.llama_batch_free(b)
    llama_cpp.llama_free(ctx)
    return tok_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batches", default="1,8,32")
    ap.add_argument("--amx", action="store_true", help="allow extra (AMX / repacked) weight buffers")
    ap.add_argument("--json")
    a = ap.parse_args()
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = a.amx
    model = llama_cpp.llama_model_load_from_file(a.gguf.encode(), mp)
    if not model:
        raise SystemExit(f"cannot load {a.gguf}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    gen = [(b, gen_speed(model, n_vocab, b, a.new_tokens, a.threads)) for b in map(int, a.gen_batches.split(","))]
    llama_cpp.llama_model_free(model)
    report = {"name": a.gguf.rsplit("/", 1)[-1], "engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__,
              "threads": a.threads, "extra_bufts": a.amx, "gen_tokens_per_sec": gen}
    print(json.dumps(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch eager reference for `kdllm bench`: the same llama configs, batch and sequence.

Optional, not run by CI:  pip install torch transformers
    python3 benches/torch_bench.py --config 5M --dtype f32 [--threads 2] [--json out.json]

Training: forward, cross-entropy, backward and an AdamW step on random (8, 256) batches, timed
over --train-steps steps after one warm-up step, in the given dtype (bf16 = weights, activations
and optimizer in bfloat16, as a pure-bf16 CPU run). Sampling: transformers' `generate` (greedy,
KV cache, exactly --new-tokens tokens after 16-token random prompts) at each --gen-batches size,
prefill included. Peak memory is the process's max RSS: run one config per process.
"""

import argparse
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SEQ, BATCH = 8192, 256, 8
# Same shapes as src/bench.rs CONFIGS: (hidden, layers, heads, ffn), tied embeddings.
CONFIGS = {"1M": (64, 6, 4, 256), "5M": (256, 4, 4, 768), "20M": (512, 5, 8, 1536)}


def model_for(name, dtype):
    hidden, layers, heads, ffn = CONFIGS[name]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def train_speed(model, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * BATCH * SEQ / (time.perf_counter() - start)


@torch.no_grad()
def gen_speed(model, batch, new_tokens):
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, 16), generator=g)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return (out.shape[1] - 16) * batch / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=CONFIGS, required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batches", default="1,8,32")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    model = model_for(a.config, dtype)
    params = sum(p.numel() for p in model.parameters())
    gen = [(b, gen_speed(model, b, a.new_tokens)) for b in map(int, a.gen_batches.split(","))]
    train = train_speed(model, a.train_steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    report = {"name": a.config, "dtype": a.dtype, "threads": a.threads, "torch": torch.__version__, "params": params,
              "train_tokens_per_sec": train, "gen_tokens_per_sec": gen, "peak_mb": peak_mb}
    print(f"{a.config} {a.dtype}: {params / 1e6:.2f}M params | train {train:.0f} tok/s | sample tok/s "
          + ", ".join(f"b{b} {t:.0f}" for b, t in gen) + f" | peak {peak_mb:.0f} MB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

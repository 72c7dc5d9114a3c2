#!/usr/bin/env python3
"""PyTorch eager reference for `kdllm bench`: the same llama configs, batch and sequence.

Optional, not run by CI:  pip install torch transformers
    python3 benches/torch_bench.py --config 5M --dtype f32 [--threads 2] [--device cuda] [--json out.json]

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

SEQ, BATCH = 256, 8
# Same shapes as src/bench.rs CONFIGS: (hidden, layers, heads, kv heads, ffn, vocab), tied embeddings.
CONFIGS = {"1M": (64, 6, 4, 4, 256, 8192), "5M": (256, 4, 4, 4, 768, 8192), "20M": (512, 5, 8, 8, 1536, 8192),
           "135M": (576, 30, 9, 3, 1536, 49152)}
DEVICE = "cpu"


def model_for(name, dtype):
    hidden, layers, heads, kv_heads, ffn, vocab = CONFIGS[name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).to(DEVICE)


def sync():
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def train_speed(model, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g).to(DEVICE)
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return steps * BATCH * SEQ / (time.perf_counter() - start)


@torch.no_grad()
def gen_speed(model, batch, new_tokens):
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), generator=g).to(DEVICE)
    sync()
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
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

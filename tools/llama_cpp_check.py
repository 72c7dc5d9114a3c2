#!/usr/bin/env python3
"""Runs a kdllm GGUF export in llama.cpp (llama-cpp-python) and compares it with kdllm.

    pip install llama-cpp-python==0.3.36 pyarrow numpy
    kdllm generate --teacher MODEL --prompts P -o SAMPLES --temperature 0 --logprobs 5 ...
    python3 tools/llama_cpp_check.py EXPORT.gguf SAMPLES [--rows N]

SAMPLES are kdllm's greedy samples of the same model (a Parquet file or folder of parts). For
each row, llama.cpp tokenizes the prompt text itself (counted against kdllm's prompt ids), then
reads kdllm's prompt ids and decodes greedily, token by token; the script reports how many rows
give exactly kdllm's completion ids, the top-1 agreement over all positions, and the largest
difference between llama.cpp's log-probs and kdllm's stored top-k log-probs (both at
temperature 1, on the same prefix). Prints one JSON line.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from llama_cpp import Llama


def rows(path, limit):
    files = sorted(Path(path).rglob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    out = []
    for f in files:
        for r in pq.read_table(f).to_pylist():
            out.append(r)
            if len(out) == limit:
                return out
    return out


def tokenize(llm, text, kdllm_ids):
    """llama.cpp's ids of `text` (special=True: a chat template's markers are special tokens, as
    kdllm reads them), with one BOS first when kdllm put one (a template may render it as text)."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    bos = llm.token_bos()
    if kdllm_ids[:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("samples")
    ap.add_argument("--rows", type=int, default=50)
    a = ap.parse_args()
    data = rows(a.samples, a.rows)
    # f32 KV cache (llama.cpp defaults to f16, which alone moves log-probs by ~1e-3).
    llm = Llama(model_path=a.gguf, n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0, type_k=0, type_v=0)
    same_text, same_prompt, agree, positions, max_diff = 0, 0, 0, 0, 0.0
    for r in data:
        prompt, want = list(r["prompt_token_ids"]), list(r["completion_token_ids"])
        same_prompt += int(tokenize(llm, r["prompt"], prompt) == prompt)
        llm.reset()
        llm.eval(prompt)
        got = []
        for i, w in enumerate(want):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            lp = logits - logits.max()
            lp = lp - np.log(np.exp(lp).sum())
            nxt = int(np.argmax(lp))
            positions += 1
            agree += int(nxt == w)
            ids, lps = r["topk_token_ids"][i], r["topk_logprobs"][i]
            max_diff = max(max_diff, max(abs(lp[t] - l) for t, l in zip(ids, lps)))
            got.append(nxt)
            # Fed kdllm's token, so every position is compared on the same prefix: llama.cpp's
            # greedy text is kdllm's exactly when every argmax is kdllm's token.
            llm.eval([w])
        same_text += int(got == want)
    print(json.dumps({
        "gguf": a.gguf, "rows": len(data), "same_prompt_tokens": same_prompt, "same_greedy_text": same_text,
        "top1_agreement": agree / max(positions, 1), "max_logprob_diff": max_diff, "positions": positions,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

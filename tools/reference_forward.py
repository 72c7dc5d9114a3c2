#!/usr/bin/env python3
"""An independent numpy forward pass for the fixtures, written from the formulas (not from
transformers' code paths), as an executable spec of what kdllm must compute.

    python3 tools/reference_forward.py [tests/fixtures/NAME ...]

Reads config.json and the safetensors weights (single file or sharded; f32/bf16/f16 upcast to
f32), runs the model in float64 on `input_ids` from expected.safetensors and prints the largest
difference from the stored transformers logits. Needs numpy, safetensors and torch (torch only
to read bf16 tensors).
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

SUPPORTED = {"llama", "mistral", "qwen2"}


def load_weights(folder):
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    w = {}
    for f in files:
        w.update({k: v.float().numpy().astype(np.float64) for k, v in load_file(str(folder / f)).items()})
    return w


def inv_freq(cfg, d):
    theta = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        low_wavelen, high_wavelen = old / lo, old / hi
        smooth = (old / wavelen - lo) / (hi - lo)
        out = np.where(wavelen > low_wavelen, inv / factor, inv)  # low frequencies: divided by factor
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)  # band: interpolate
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, out)
    raise ValueError(f"rope_type {kind} not implemented here")


def sliding_windows(cfg):
    """The window of each layer (None: full causal attention), as transformers 4.57 decides it."""
    n = cfg["num_hidden_layers"]
    mt = cfg["model_type"]
    if mt == "llama":
        return [None] * n
    if mt == "mistral":
        return [cfg.get("sliding_window")] * n
    # qwen2: Qwen2Config nulls sliding_window unless use_sliding_window; then layer_types
    # (or, when absent, layer i slides iff i >= max_window_layers).
    w = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    types = cfg.get("layer_types") or [
        "sliding_attention" if w is not None and i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    return [w if t == "sliding_attention" else None for t in types]


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def linear(w, prefix, x):
    y = x @ w[prefix + ".weight"].T
    b = w.get(prefix + ".bias")
    return y if b is None else y + b


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def forward(folder, ids):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] in SUPPORTED, cfg["model_type"]
    w = load_weights(folder)
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    B, T = ids.shape
    pos = np.arange(T, dtype=np.float64)
    freqs = pos[:, None] * inv_freq(cfg, D)[None, :]
    emb = np.concatenate([freqs, freqs], -1)  # (T, D): frequency j at dims j and j + D/2
    cos, sin = np.cos(emb), np.sin(emb)
    q_idx, k_idx = np.arange(T)[:, None], np.arange(T)[None, :]

    x = w["model.embed_tokens.weight"][ids]
    for i, window in enumerate(sliding_windows(cfg)):
        p = f"model.layers.{i}"
        allowed = k_idx <= q_idx
        if window is not None:
            allowed &= k_idx > q_idx - window  # the last `window` positions, the query's own included
        h = rms_norm(x, w[p + ".input_layernorm.weight"], eps)
        q = linear(w, p + ".self_attn.q_proj", h).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = linear(w, p + ".self_attn.k_proj", h).reshape(B, T, KV, D).transpose(0, 2, 1, 3)
        v = linear(w, p + ".self_attn.v_proj", h).reshape(B, T, KV, D).transpose(0, 2, 1, 3)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # head h uses kv head h // (H/KV)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
        s = np.where(allowed, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)
        x = x + linear(w, p + ".self_attn.o_proj", o)
        h = rms_norm(x, w[p + ".post_attention_layernorm.weight"], eps)
        g = linear(w, p + ".mlp.gate_proj", h)
        x = x + linear(w, p + ".mlp.down_proj", g / (1 + np.exp(-g)) * linear(w, p + ".mlp.up_proj", h))
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else w["lm_head.weight"]
    return x @ head.T


def main(argv):
    root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    folders = [Path(a) for a in argv] or sorted(p.parent for p in root.glob("*/expected.safetensors"))
    worst = 0.0
    for folder in folders:
        exp = load_file(str(folder / "expected.safetensors"))
        ours = forward(folder, exp["input_ids"].numpy())
        d = float(np.abs(ours - exp["logits"].numpy().astype(np.float64)).max())
        worst = max(worst, d)
        print(f"{folder.name:<12} max|numpy - transformers| {d:.3g}")
    assert worst < 1e-4, worst


if __name__ == "__main__":
    main(sys.argv[1:])

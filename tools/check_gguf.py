#!/usr/bin/env python3
"""Checks a kdllm GGUF export against the `gguf` package (llama.cpp's own gguf-py).

    pip install gguf safetensors numpy
    python3 tools/check_gguf.py MODEL_DIR EXPORT.gguf

Reads the export with gguf-py's GGUFReader and checks, for every tensor, that its bytes equal
gguf-py's encoding (`gguf.quants.quantize`, a numpy port of ggml's reference quantizers) of the
model's safetensors weights, with q_proj/k_proj rows permuted as llama.cpp's converter does
(`LlamaModel.permute`). Also checks the metadata llama.cpp needs. Exits 1 on any mismatch.
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants
from safetensors.numpy import load_file

NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[module]}.{kind}"


def permute(w, n_head):
    # convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main(model_dir, path):
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    weights = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(f))
    reader = GGUFReader(path)
    fields = {k: v for k, v in reader.fields.items()}
    def scalar(key):
        f = fields[key]
        return f.parts[f.data[0]].tolist()[0] if f.types[0].name != "STRING" else bytes(f.parts[f.data[0]]).decode()
    problems = []
    want = {"general.architecture": "llama", "llama.block_count": cfg["num_hidden_layers"],
            "llama.embedding_length": cfg["hidden_size"], "llama.attention.head_count": cfg["num_attention_heads"],
            "llama.attention.head_count_kv": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            "llama.feed_forward_length": cfg["intermediate_size"], "tokenizer.ggml.model": "gpt2"}
    for key, value in want.items():
        if key not in fields or scalar(key) != value:
            problems.append(f"metadata {key}: {scalar(key) if key in fields else 'missing'} != {value}")
    for key in ["tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"]:
        if key not in fields:
            problems.append(f"metadata {key} missing")
    tensors = {t.name: t for t in reader.tensors}
    if cfg.get("tie_word_embeddings") and "output.weight" in tensors:
        problems.append("tied embeddings, but output.weight is written")
    checked = {}
    for hf, w in weights.items():
        name = gguf_name(hf)
        t = tensors.get(name)
        if t is None:
            problems.append(f"{name} ({hf}) missing")
            continue
        w = w.astype(np.float32)
        if ".attn_q." in name:
            w = permute(w, cfg["num_attention_heads"])
        if ".attn_k." in name:
            w = permute(w, cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        qtype = GGMLQuantizationType(int(t.tensor_type))
        ours = bytes(np.asarray(t.data).tobytes())
        theirs = quants.quantize(w, qtype).tobytes()
        checked[qtype.name] = checked.get(qtype.name, 0) + 1
        if ours != theirs:
            problems.append(f"{name}: bytes differ from gguf-py's {qtype.name} encoding")
        if list(reversed([int(d) for d in t.shape])) != list(w.shape):
            problems.append(f"{name}: shape {list(t.shape)} (GGUF order) for {list(w.shape)}")
    print(f"{path}: {len(tensors)} tensors, checked {checked}, pre-tokenizer {scalar('tokenizer.ggml.pre')}")
    for p in problems:
        print("MISMATCH", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

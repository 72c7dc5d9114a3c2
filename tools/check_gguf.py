#!/usr/bin/env python3
"""Checks a kdllm GGUF export against the `gguf` package (llama.cpp's own gguf-py).

    pip install gguf safetensors numpy
    python3 tools/check_gguf.py MODEL_DIR EXPORT.gguf [--f32 F32_EXPORT.gguf]

Reads the export with gguf-py's GGUFReader and checks, for every tensor, that its bytes equal
gguf-py's encoding (`gguf.quants.quantize`, a numpy port of ggml's reference quantizers) of the
model's safetensors weights, with q_proj/k_proj rows permuted as llama.cpp's converter does
(`LlamaModel.permute`). gguf-py cannot encode the k-quants (Q4_K); for those, give kdllm's f32
export of the same model with --f32: llama.cpp itself (llama-cpp-python's
`llama_model_quantize`, every tensor to the one type) quantizes it, and the bytes are compared.
Also checks the metadata llama.cpp needs. Exits 1 on any mismatch.
"""
import argparse
import ctypes
import json
import sys
import tempfile
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


# llama_ftype of a file mostly of each k-quant.
K_QUANT_FTYPES = {GGMLQuantizationType.Q4_K: 14}


def llama_cpp_quantized(f32_path, qtype):
    """Tensor bytes of llama.cpp's own quantization of f32_path, every matrix to qtype."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = K_QUANT_FTYPES[qtype], True, 2
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "q.gguf")
        if llama_cpp.llama_model_quantize(f32_path.encode(), out.encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize {f32_path} to {qtype.name}")
        return {t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes())) for t in GGUFReader(out).tensors}


def main(model_dir, path, f32_path=None):
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
            "llama.feed_forward_length": cfg["intermediate_size"]}
    for key, value in want.items():
        if key not in fields or scalar(key) != value:
            problems.append(f"metadata {key}: {scalar(key) if key in fields else 'missing'} != {value}")
    tokenizer = scalar("tokenizer.ggml.model") if "tokenizer.ggml.model" in fields else None
    # Byte-level BPE carries merges; SentencePiece carries scores.
    vocab_key = {"gpt2": "tokenizer.ggml.merges", "llama": "tokenizer.ggml.scores"}.get(tokenizer)
    if vocab_key is None:
        problems.append(f"tokenizer.ggml.model {tokenizer!r} is neither gpt2 nor llama")
    for key in ["tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id"] + [vocab_key] * bool(vocab_key):
        if key not in fields:
            problems.append(f"metadata {key} missing")
    tensors = {t.name: t for t in reader.tensors}
    if cfg.get("tie_word_embeddings") and "output.weight" in tensors:
        problems.append("tied embeddings, but output.weight is written")
    checked = {}
    reference = None
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
        if qtype in K_QUANT_FTYPES:
            if f32_path is None:
                problems.append(f"{name}: {qtype.name} needs --f32 (gguf-py cannot encode it)")
                continue
            reference = reference or llama_cpp_quantized(f32_path, qtype)
            ref_type, theirs = reference[name]
            source = "llama.cpp's"
            if ref_type != t.tensor_type:
                problems.append(f"{name}: llama.cpp wrote {ref_type.name}")
        else:
            theirs, source = quants.quantize(w, qtype).tobytes(), "gguf-py's"
        checked[qtype.name] = checked.get(qtype.name, 0) + 1
        if ours != theirs:
            problems.append(f"{name}: bytes differ from {source} {qtype.name} encoding")
        if list(reversed([int(d) for d in t.shape])) != list(w.shape):
            problems.append(f"{name}: shape {list(t.shape)} (GGUF order) for {list(w.shape)}")
    print(f"{path}: {len(tensors)} tensors, checked {checked}, pre-tokenizer {scalar('tokenizer.ggml.pre')}")
    for p in problems:
        print("MISMATCH", p)
    return 1 if problems else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("export")
    ap.add_argument("--f32", help="kdllm's f32 export of the same model, for the k-quants")
    a = ap.parse_args()
    sys.exit(main(a.model_dir, a.export, a.f32))

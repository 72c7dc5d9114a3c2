#!/usr/bin/env python3
"""Write tiny reference checkpoints and their transformers logits into tests/fixtures/.

Optional tool, not run by CI. To regenerate the fixtures:

    pip install torch transformers safetensors
    python3 tools/make_fixtures.py            # from the repository root

(The committed fixtures were made with torch 2.15 / transformers 4.57.6 on CPU.)

Each fixture folder holds what `model.save_pretrained(dir, safe_serialization=True)` writes
(config.json, generation_config.json, model.safetensors or shards + index) and
`expected.safetensors` with

    input_ids  int64   (2, T)     T = 20, no padding, drawn from a seeded generator
    logits     float32 (2, T, V)  transformers, float32, attn_implementation="eager", eval, no_grad

The logits are always computed from the weights as saved (reloaded from the folder into a
float32 model), so the bf16 / f16 fixtures hold logits of the rounded weights upcast to f32,
which is what kdllm computes.

Weights are re-initialised from a seeded generator so the logits vary a lot (transformers'
default std 0.02 gives near-uniform logits): matrices N(0, W_STD^2), biases N(0, B_STD^2), norm
weights 1 + 0.1 N(0, 1). Rerunning gives byte-identical files on the same torch/transformers.
"""

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Qwen2Config,
    Qwen2ForCausalLM,
)

T = 20
W_STD = 0.3
B_STD = 0.2
ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def reinit(model, seed):
    """Overwrite every parameter (tied ones once) from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(B_STD * noise)
            else:
                p.copy_(W_STD * noise)


def input_ids(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, T), generator=g, dtype=torch.int64)


def load_f32(folder, config=None):
    kw = {"config": config} if config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", **kw
    )
    return model.eval()


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float().contiguous()


def fresh_dir(name):
    d = ROOT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def patch_config(folder, edit):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_expected(folder, ids, logits):
    # One key only: safetensors does not keep the order of several metadata keys stable.
    meta = {"made_by": f"tools/make_fixtures.py, torch {torch.__version__.split('+')[0]}, transformers {transformers.__version__}"}
    save_file({"input_ids": ids.contiguous(), "logits": logits}, str(folder / "expected.safetensors"), metadata=meta)


def default_inv_freq(theta, dim):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def max_diff(a, b):
    return (a - b).abs().max().item()


def make(name, model_cls, config, seed, save_dtype=torch.float32, save_kw=None, edit_config=None, checks=()):
    """Build, save and reference one fixture. `checks` are (label, config_edit, min_diff) triples:
    the saved weights are reloaded under the edited config and its logits must differ from the
    reference by more than min_diff (or by at most -min_diff when min_diff is negative: must match)."""
    folder = fresh_dir(name)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    reinit(model, seed)
    model = model.to(save_dtype)
    model.save_pretrained(folder, safe_serialization=True, **(save_kw or {}))
    if edit_config is not None:
        patch_config(folder, edit_config)

    ref = load_f32(folder)
    ids = input_ids(ref.config.vocab_size, seed + 1)
    logits = logits_of(ref, ids)
    assert logits.shape == (2, T, ref.config.vocab_size)
    assert torch.isfinite(logits).all()
    write_expected(folder, ids, logits)

    notes = []
    for label, edit, min_diff in checks:
        cfg = copy.deepcopy(ref.config)
        edit(cfg)
        other = logits_of(load_f32(folder, cfg), ids)
        d = max_diff(logits, other)
        if min_diff >= 0:
            assert d > min_diff, f"{name}: {label}: logits differ only by {d:.3g} (want > {min_diff})"
        else:
            assert d <= -min_diff, f"{name}: {label}: logits differ by {d:.3g} (want <= {-min_diff})"
        notes.append(f"{label}: max|diff| {d:.4g}")
    biased = sorted({n.split(".")[-2] for n, _ in ref.named_parameters() if n.endswith(".bias")})
    if biased:
        notes.append("biases on: " + ", ".join(biased))
    params = ref.num_parameters()
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(
        f"{name:<12} params {params:>6}  T {T}  V {ref.config.vocab_size}  max|logit| {logits.abs().max().item():7.3f}  "
        f"std {logits.std().item():6.3f}  files {size / 1024:6.1f} KiB" + "".join(f"\n    {n}" for n in notes)
    )
    return ref


def set_attr(**kv):
    def edit(cfg):
        for k, v in kv.items():
            setattr(cfg, k, v)

    return edit


def zero_biases_of(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.zero_()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, writing {ROOT}")
    ROOT.mkdir(parents=True, exist_ok=True)

    # llama2: MHA, untied, theta 1e4, eps 1e-5, sharded safetensors + index.
    make(
        "llama2",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        ),
        seed=1,
        save_kw={"max_shard_size": "40KB"},
    )
    shards = sorted(p.name for p in (ROOT / "llama2").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (ROOT / "llama2" / "model.safetensors.index.json").is_file(), shards
    print(f"    shards: {len(shards)} + model.safetensors.index.json")

    # llama3.2: GQA 2:1, tied, theta 5e5, llama3 rope scaling with a small original length (40)
    # chosen so the 8 frequencies of head_dim 16 hit all three branches: wavelength 6.3 < 40/4 is
    # kept, 32.5 lies in the band [10, 40] and is interpolated, the other six are divided by 32.
    make(
        "llama3.2",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 40,
            },
            bos_token_id=0, eos_token_id=[1, 2],
        ),
        seed=2,
        checks=[("rope_scaling removed", set_attr(rope_scaling=None), 1e-2)],
    )
    rope = AutoModelForCausalLM.from_pretrained(ROOT / "llama3.2").model.rotary_emb
    ratio = (rope.inv_freq / default_inv_freq(500000.0, 16)).tolist()
    kinds = ["kept" if abs(r - 1) < 1e-6 else "divided" if abs(r - 1 / 32) < 1e-6 else "interpolated" for r in ratio]
    assert kinds[0] == "kept" and kinds[1] == "interpolated" and set(kinds[2:]) == {"divided"}, ratio
    print("    inv_freq scaled/default: " + ", ".join(f"{r:.4g}" for r in ratio))

    # llama-bias: attention_bias (q, k, v and o) and mlp_bias (gate, up, down).
    ref = make(
        "llama-bias",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
        ),
        seed=3,
    )
    with torch.no_grad():
        ids = input_ids(ref.config.vocab_size, 3 + 1)
        base = logits_of(ref, ids)
        for part in ["self_attn.o_proj", "self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj"]:
            m = copy.deepcopy(ref)
            for layer in m.model.layers:
                mod = layer.get_submodule(part)
                mod.bias.zero_()
            print(f"    {part}.bias zeroed: max|diff| {max_diff(base, logits_of(m, ids)):.4g}")
        m = copy.deepcopy(ref)
        zero_biases_of(m)
        d = max_diff(base, logits_of(m, ids))
        assert d > 1e-2
        print(f"    all biases zeroed: max|diff| {d:.4g}")

    # tinyllama: GQA 4:1, untied, weights stored in bfloat16.
    make(
        "tinyllama",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
        ),
        seed=4,
        save_dtype=torch.bfloat16,
    )

    # smollm2: tied, GQA 3:1, theta 1e5, explicit head_dim 12 (hidden/heads would be 16), float16.
    make(
        "smollm2",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=1, head_dim=12, max_position_embeddings=64,
            rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        ),
        seed=5,
        save_dtype=torch.float16,
    )

    # mistral: sliding_window 6 < T on every layer, GQA, untied, head_dim null in config.json.
    make(
        "mistral",
        MistralForCausalLM,
        MistralConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=6, tie_word_embeddings=False,
        ),
        seed=6,
        checks=[
            ("sliding_window None", set_attr(sliding_window=None), 1e-2),
            ("sliding_window 5", set_attr(sliding_window=5), 1e-2),
            ("sliding_window 7", set_attr(sliding_window=7), 1e-2),
        ],
    )

    # qwen2: tied, GQA, q/k/v biases (no o bias), no sliding window (layer_types as 4.57 writes it).
    make(
        "qwen2",
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            use_sliding_window=False, max_window_layers=2,
        ),
        seed=7,
    )

    # qwen2.5: untied, theta 1e6, use_sliding_window false with sliding_window 6 and
    # max_window_layers 1 left in config.json, and no layer_types: as in the Qwen2.5 hub configs.
    # transformers 4.57 sets sliding_window = None when use_sliding_window is false, so none of
    # this slides; the checks show that a wrongly applied window would change the logits.
    def qwen25_hub_style(cfg):
        cfg["sliding_window"] = 6
        cfg["max_window_layers"] = 1
        cfg.pop("layer_types", None)

    def slide(layers):
        def edit(cfg):
            cfg.use_sliding_window = True
            cfg.sliding_window = 6
            cfg.layer_types = layers

        return edit

    make(
        "qwen2.5",
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            use_sliding_window=False, max_window_layers=1,
        ),
        seed=8,
        edit_config=qwen25_hub_style,
        checks=[
            ("window 6 on all layers (max_window_layers 0)", slide(["sliding_attention"] * 2), 1e-2),
            ("window 6 on layers >= max_window_layers 1", slide(["full_attention", "sliding_attention"]), 1e-2),
        ],
    )
    cfg = transformers.AutoConfig.from_pretrained(ROOT / "qwen2.5")
    assert cfg.sliding_window is None and cfg.layer_types == ["full_attention"] * 2, cfg
    print("    transformers reads it back with sliding_window None, layer_types all full_attention")

    # unsupported-phi3: a config.json only; kdllm must refuse model_type phi3.
    folder = fresh_dir("unsupported-phi3")
    Phi3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["Phi3ForCausalLM"],
    ).save_pretrained(folder)
    print(f"{'unsupported-phi3':<12} config.json only ({(folder / 'config.json').stat().st_size} bytes)")

    total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    print(f"total tests/fixtures: {total / 1024:.1f} KiB")
    assert total < 2 * 1024 * 1024


if __name__ == "__main__":
    sys.exit(main())

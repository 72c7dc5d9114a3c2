#!/usr/bin/env python3
"""Check that transformers loads a kdllm-exported student folder, and write its reference logits.

Optional tool, not run by CI:

    pip install torch transformers safetensors
    python3 tools/check_export.py FOLDER [--kdllm-logits FILE] [--skip-tokenizer]

It
  1. loads FOLDER with `AutoModelForCausalLM.from_pretrained` and fails if any weight is missing,
     unexpected or of the wrong shape (transformers would otherwise initialise it at random and
     only warn);
  2. loads `AutoTokenizer.from_pretrained(FOLDER)` and checks that a sample string survives
     encode -> decode (skip with --skip-tokenizer for a folder without a tokenizer);
  3. computes float32 logits with attn_implementation="eager", eval(), no_grad, for fixed input
     ids (2 rows of T = 20 ids from a seeded generator over the vocab, no padding), or for the
     `input_ids` of --kdllm-logits FILE when given;
  4. if 1-3 passed, writes FOLDER/transformers_expected.safetensors in the fixtures' format
     (input_ids int64 (2, T), logits float32 (2, T, V)), for kdllm's parity test
     (KDLLM_PARITY_DIR=FOLDER);
  5. with --kdllm-logits FILE (same format, written by kdllm), prints the largest difference
     between kdllm's and transformers' logits and fails above --tol.
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

T = 20
SEED = 1234
SAMPLE = "Once upon a time, a small model learned from a big one. It said: 42!"


def check_tokenizer(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    back = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    ok = back == SAMPLE
    print(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens; sample -> {len(ids)} ids -> "
          f"{'round-trips' if ok else 'DIFFERS: ' + repr(back)}")
    with_special = tok.encode(SAMPLE)
    extra = [i for i in with_special if i not in ids]
    print(f"  encode() with special tokens adds {extra} (bos {tok.bos_token_id}, eos {tok.eos_token_id})")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--kdllm-logits", type=Path, help="safetensors with kdllm's input_ids and logits to compare")
    ap.add_argument("--skip-tokenizer", action="store_true", help="the folder has no tokenizer")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |kdllm - transformers| allowed (default 1e-4)")
    args = ap.parse_args()
    folder = args.folder
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, folder {folder}")
    failures = []

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            failures.append(f"{kind}: {sorted(map(str, info[kind]))}")
    cfg = model.config
    print(f"model: {type(model).__name__} (model_type {cfg.model_type}), {model.num_parameters()} params, "
          f"vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, "
          f"heads {cfg.num_attention_heads}/{getattr(cfg, 'num_key_value_heads', None)} kv, "
          f"tied {cfg.tie_word_embeddings}")

    if args.skip_tokenizer:
        print("tokenizer: skipped")
    elif not check_tokenizer(folder):
        failures.append("tokenizer does not round-trip the sample string")

    kdllm = load_file(str(args.kdllm_logits)) if args.kdllm_logits else None
    if kdllm is not None:
        ids = kdllm["input_ids"].to(torch.int64)
        if ids.dim() != 2 or ids.min() < 0 or ids.max() >= cfg.vocab_size:
            print(f"FAILED: {args.kdllm_logits}: input_ids must be (B, T) in [0, {cfg.vocab_size})")
            return 1
    else:
        g = torch.Generator().manual_seed(SEED)
        ids = torch.randint(0, cfg.vocab_size, (2, T), generator=g, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().contiguous()
    if not torch.isfinite(logits).all():
        failures.append("non-finite logits")
    if failures:  # no reference file from a half-loaded model or a broken tokenizer
        print("FAILED (nothing written):\n  " + "\n  ".join(failures))
        return 1
    out = folder / "transformers_expected.safetensors"
    save_file(
        {"input_ids": ids.contiguous(), "logits": logits},
        str(out),
        metadata={"made_by": f"tools/check_export.py, torch {torch.__version__.split('+')[0]}, "
                             f"transformers {transformers.__version__}"},
    )
    print(f"logits {tuple(logits.shape)}: max|logit| {logits.abs().max().item():.4f}, std {logits.std().item():.4f}, "
          f"argmax of the last position {logits[:, -1].argmax(-1).tolist()}")
    print(f"wrote {out}")

    if kdllm is not None:
        theirs = kdllm["logits"].float()
        if theirs.shape != logits.shape:
            failures.append(f"kdllm logits shape {tuple(theirs.shape)} != {tuple(logits.shape)}")
        else:
            d = (theirs - logits).abs().max().item()
            print(f"kdllm vs transformers: max|diff| {d:.3g} (tol {args.tol:g})")
            if not d <= args.tol:
                failures.append(f"kdllm logits differ by {d:.3g} > {args.tol:g}")

    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

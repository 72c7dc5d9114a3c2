"""Writes sentencepiece_tiny.json: a tiny SentencePiece BPE model exported the way llama.cpp's
convert_hf_to_gguf.py (`_create_vocab_sentencepiece`) writes `tokenizer.ggml.*` metadata, plus
reference ids from sentencepiece itself. Used by src/tokenizer.rs's GGUF SentencePiece tests.

    pip install sentencepiece==0.2.3 && python3 tests/data/make_sentencepiece_tiny.py
"""
import io
import json
import pathlib

import sentencepiece as spm

corpus = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park! The sun was warm.",
    "Tabs\tand spaces   and newlines, caf\u00e9 and na\u00efve.",
] + [f"{i} + {i * 7} = {i * 8}. The cat sat on the mat." for i in range(200)]

model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=360,
    byte_fallback=True, character_coverage=0.995, split_digits=True, add_dummy_prefix=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<think>"], minloglevel=2,
)
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

# llama.cpp's SentencePieceTokenTypes: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
def token_type(i):
    if sp.IsUnknown(i): return 2
    if sp.IsControl(i): return 3
    if sp.IsUnused(i): return 5
    if sp.IsByte(i): return 6
    if sp.IdToPiece(i) == "<think>": return 4
    return 1

texts = [
    "Once upon a time",
    "The cat sat on the mat.",
    "  two leading spaces, and  two inside",
    "123+45=168",
    "unseen: \u00dc\u00f1\u00ee \u65e5\u672c \U0001f642\n",
]
out = {
    "source": "sentencepiece " + spm.__version__ + ", tests/data/make_sentencepiece_tiny.py",
    "tokens": [sp.IdToPiece(i) for i in range(sp.GetPieceSize())],
    "scores": [sp.GetScore(i) for i in range(sp.GetPieceSize())],
    "token_type": [token_type(i) for i in range(sp.GetPieceSize())],
    "add_space_prefix": True,
    "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "unknown_token_id": sp.unk_id(),
    "expected": [{"text": t, "ids": sp.Encode(t), "decoded": sp.Decode(sp.Encode(t))} for t in texts]
    # llama.cpp (and transformers' legacy Llama tokenizer) split added tokens out first and give each
    # following text fragment its own space prefix; sentencepiece alone would not prefix "b".
    + [{"text": "a<think>b", "ids": sp.Encode("a") + [sp.PieceToId("<think>")] + sp.Encode("b"), "decoded": "a<think> b"}],
}
path = pathlib.Path(__file__).with_name("sentencepiece_tiny.json")
path.write_text(json.dumps(out, ensure_ascii=False, indent=None) + "\n")
for e in out["expected"]:
    print(json.dumps(e, ensure_ascii=False))

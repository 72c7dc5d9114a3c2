#!/usr/bin/env bash
# The GPU check, in two halves.
#
#   tools/gpu-check.sh --pack    # here (no GPU needed): build with CUDA (tools/build-cuda.sh),
#                                # and pack the binaries and stories260K into gpu-bundle/
#   tools/gpu-check.sh           # on a machine with an NVIDIA GPU (CUDA 13 driver), from the
#                                # repository root with gpu-bundle/ carried along
#
# On the GPU it prints, in well under 10 minutes:
#   1. the parity fixtures and stories260K on CUDA: the test binaries of the CUDA build with
#      KDLLM_TEST_DEVICE=cuda (logits within 1e-3 of transformers', the CPU's are within 1e-4;
#      stories260K's greedy text equal to the reference);
#   2. the quickstart with --device cuda, timed;
#   3. training and sampling tokens/s of SmolLM2-135M's shape in bf16: `kdllm bench --device
#      cuda` against PyTorch eager (benches/torch_bench.py --device cuda), and their ratios.
# Needs python3 with torch and transformers on the GPU machine (its CUDA 13 libraries are the
# ones the binary loads).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle

if [ "${1:-}" = "--pack" ]; then
  tools/build-cuda.sh
  tools/build-cuda.sh --tests --message-format=json-render-diagnostics > target-cuda/tests.json
  rm -rf "$bundle" && mkdir -p "$bundle/bin"
  cp target-cuda/release/kdllm "$bundle/bin/"
  for t in parity stories260k; do
    exe=$(python3 -c "
import json, sys
for line in open('target-cuda/tests.json'):
    if not line.startswith('{'):
        continue
    m = json.loads(line)
    if m.get('reason') == 'compiler-artifact' and m['target']['name'] == '$t' and m.get('executable'):
        print(m['executable'])" | tail -1)
    cp "$exe" "$bundle/bin/$t"
  done
  strip "$bundle"/bin/*
  shared=${KDLLM_SHARED:-../shared}
  [ -d "$shared/models/stories260K" ] && mkdir -p "$bundle/shared/models" && cp -r "$shared/models/stories260K" "$bundle/shared/models/"
  xz -T0 -6 "$bundle"/bin/*
  du -sh "$bundle"
  exit 0
fi

[ -d "$bundle/bin" ] || { echo "no $bundle/: run tools/gpu-check.sh --pack on the build machine and carry it" >&2; exit 2; }
for f in "$bundle"/bin/*.xz; do [ -e "$f" ] && xz -d -f "$f"; done
chmod +x "$bundle"/bin/*
bin=$PWD/$bundle/bin
nvlib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=${nvlib:+$nvlib:}${LD_LIBRARY_PATH:-}
if ldd "$bin/kdllm" | grep 'not found'; then
  echo "the CUDA binary is missing libraries above; point LD_LIBRARY_PATH at the CUDA 13 libraries" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"

echo "== 1. parity fixtures and stories260K on CUDA"
export KDLLM_SHARED=$PWD/$bundle/shared
KDLLM_TEST_DEVICE=cuda "$bin/parity" --test-threads 1 --nocapture 2>&1 | grep -E 'max abs diff|test result|panicked'
KDLLM_TEST_DEVICE=cuda "$bin/stories260k" greedy_decoding_reproduces_the_reference_continuation 2>&1 | grep -E 'test result|panicked'

echo "== 2. the quickstart on the GPU"
start=$(date +%s)
"$bin/kdllm" train --recipe recipes/quickstart.yaml --device cuda --set workdir="$out/quickstart" | sed -n '/^model /,$p'
echo "quickstart: $(( $(date +%s) - start )) s"

echo "== 3. SmolLM2-135M's shape in bf16: kdllm against PyTorch eager"
"$bin/kdllm" bench --device cuda --configs 135M --dtype bf16 --train-steps 10 --gen-batches 1,16,64,256 --json "$out/kdllm.json"
python3 benches/torch_bench.py --device cuda --config 135M --dtype bf16 --train-steps 10 --gen-batches 1,16,64,256 --json "$out/torch.json"
python3 - "$out/kdllm.json" "$out/torch.json" <<'EOF'
import json, sys
k = json.load(open(sys.argv[1]))["models"][0]
t = json.load(open(sys.argv[2]))
best = lambda rows: max(v for _, v in rows)
print(f"train  kdllm {k['train_tokens_per_sec']:.0f} tok/s, torch {t['train_tokens_per_sec']:.0f}: "
      f"{k['train_tokens_per_sec'] / t['train_tokens_per_sec']:.2f}x")
print(f"sample kdllm {best(k['gen_tokens_per_sec']):.0f} tok/s, torch {best(t['gen_tokens_per_sec']):.0f} (best batch): "
      f"{best(k['gen_tokens_per_sec']) / best(t['gen_tokens_per_sec']):.2f}x")
EOF

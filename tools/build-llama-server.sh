#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the HTTP server kdllm's "server teachers" talk to) from the
# llama.cpp that llama-cpp-python 0.3.36 vendors, and prints the binary's path.
#
#   tools/build-llama-server.sh           # into ${XDG_CACHE_HOME:-$HOME/.cache}/kdllm/llama-server
#   tools/build-llama-server.sh DIR       # into DIR
#
# The source is the PyPI sdist of llama-cpp-python 0.3.36 (ggml-org/llama.cpp@0c1e57098, per its
# CHANGELOG), so pip is all it needs to fetch: no git, no GitHub. cmake comes from PyPI too when
# there is none on PATH. The build is static (one self-contained binary, CPU only, no CURL, no
# OpenSSL, no web UI: the UI's assets would come from the network) and took 13.4 minutes of
# compiling on this project's 2-core machine. Progress goes to stderr; the last line on stdout is
# the path of DIR/bin/llama-server (15 MB, needs only libc/libstdc++/libgomp). Running it again
# reuses what is there (the installed binary, else the source tree and build folder). DIR/work
# (about 500 MB) can be deleted once the binary is installed.
#
# `llama-server --version` and GET /props "build_info" say build 1, commit 0c1e57098: the sdist
# carries the vendored llama.cpp's git metadata as a one-commit shallow clone, so the commit is
# right but the build number (upstream's commit count, bNNNN) is not.
#
# Environment: JOBS (default 2) parallel compile jobs.
set -euo pipefail

version="0.3.36"
# "update llama.cpp to ggml-org/llama.cpp@0c1e57098" in its CHANGELOG; full hash
# 0c1e57098bba43ac29e6e3b677cdceebdd22334f. Passed to cmake for the case git cannot read it.
llama_commit="0c1e57098"
sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
dir="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/kdllm/llama-server}"
jobs="${JOBS:-2}"
bin="$dir/bin/llama-server"

log() { echo "build-llama-server: $*" >&2; }

if [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1; then
    echo "$bin"
    exit 0
fi

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
bin="$dir/bin/llama-server"
work="$dir/work"
src="$work/llama_cpp_python-$version"
sdist="$work/llama_cpp_python-$version.tar.gz"
mkdir -p "$work"

# pip needs to read the sdist's metadata to "download" it, which for llama-cpp-python's
# scikit-build-core backend means importing scikit-build-core and finding cmake >= 3.21. Left
# to itself (build isolation) pip would build cmake and ninja from source for that, so a small
# venv holds the two instead (binary wheels) and pip runs with --no-build-isolation.
venv="$work/venv"
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv (scikit-build-core, and cmake if there is none on PATH)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    pkgs=(scikit-build-core)
    command -v cmake >/dev/null 2>&1 || pkgs+=(cmake)
    "$venv/bin/python" -m pip install --quiet "${pkgs[@]}" >&2
fi
export PATH="$venv/bin:$PATH" # its cmake (if any) first

if [[ ! -f "$sdist" ]] || ! echo "$sdist_sha256  $sdist" | sha256sum --check --status; then
    log "downloading the llama-cpp-python==$version sdist from PyPI (77 MB)"
    rm -f "$sdist"
    "$venv/bin/python" -m pip download "llama-cpp-python==$version" --no-binary :all: --no-deps \
        --no-build-isolation --quiet -d "$work" >&2
    if ! echo "$sdist_sha256  $sdist" | sha256sum --check --status; then
        echo "error: $sdist does not have the expected SHA-256 $sdist_sha256" >&2
        exit 1
    fi
fi

if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
    log "extracting $sdist"
    rm -rf "$src"
    tar -xzf "$sdist" -C "$work"
fi

build="$work/build"
log "configuring ($(cmake --version | head -n1)) in $build"
# GGML_NATIVE (the default) compiles for this CPU, AVX-512 included where there is one.
# AMX: llama.cpp's AMX kernels (and their "extra buffer type", a repacking of the weights at load
# time) are compiled in only where the compiler's view of the CPU includes AMX; on the Firecracker
# VM that benches/llama_cpp_bench.py was written on they crashed with SIGSEGV at `ldtilecfg`.
# Under GGML_NATIVE, -march=native decides (gcc 12 on this project's Zen 5 machine: no AMX); the
# GGML_AMX_* options below only keep a non-native build (GGML_NATIVE=OFF) from turning them on. At
# run time `llama-server --no-repack` turns off every extra weight buffer (the server's
# counterpart of use_extra_bufts=False in that bench); tools/record_engine_fixtures.py passes it.
cmake -S "$src/vendor/llama.cpp" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_COMMIT="$llama_commit" \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    >&2
log "building llama-server with $jobs jobs (about 14 minutes on 2 cores)"
start=$SECONDS
nice cmake --build "$build" --config Release --target llama-server -j "$jobs" >&2
log "built in $((SECONDS - start)) s"

mkdir -p "$dir/bin"
install -m 755 "$build/bin/llama-server" "$bin.part"
mv "$bin.part" "$bin"
"$bin" --version >&2
echo "$bin"

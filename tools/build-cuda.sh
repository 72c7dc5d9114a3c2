#!/usr/bin/env bash
# Builds kdllm with CUDA on a machine without a GPU or a CUDA install: nvcc, headers and
# libraries come from NVIDIA's PyPI wheels, pinned to CUDA 13.0 (PTX from a newer nvcc does not
# load on a 13.0 driver). The binary lands in target-cuda/release/kdllm; it needs the driver's
# libcuda and the CUDA 13 libraries (libcublas, libcurand, libnvrtc) at run time.
#
#   tools/build-cuda.sh            # install the toolkit into .cuda13/ (once), then build
#   CUDA_COMPUTE_CAP=80 tools/build-cuda.sh   # another GPU generation (default 90: H100/H200)
#
# The default build (`cargo build --release`, the tests, CI) stays CPU-only.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD/.cuda13
cu=$root/nvidia/cu13
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)
if [ ! -x "$cu/bin/nvcc" ]; then
  # --no-deps: the wheels' own dependencies would pull newer headers beside the 13.0 nvcc.
  # PIP_FIND_LINKS may point at a folder of already downloaded wheels.
  python3 -m pip install --quiet --no-deps --target "$root" "${wheels[@]}"
fi
[ -x "$cu/bin/nvcc" ] || { echo "no nvcc under $cu/bin after installing the wheels" >&2; exit 1; }

# The wheels ship only versioned libraries; the linker wants the plain names.
(
  cd "$cu/lib"
  for lib in cudart:13 cublas:13 cublasLt:13 nvrtc:13 curand:10; do
    name=${lib%:*} version=${lib#*:}
    [ -e "lib$name.so.$version" ] || { echo "lib$name.so.$version missing from $cu/lib" >&2; exit 1; }
    ln -sf "lib$name.so.$version" "lib$name.so"
  done
  # No driver here: link against a stub with libcuda's symbols; the real one is loaded at run time.
  if [ ! -e stubs/libcuda.so ]; then
    mkdir -p stubs
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$cu/include/cuda.h" | sort -u | sed 's/.*/void &(void){}/' > stubs/libcuda.c
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda.c
  fi
)

export PATH=$cu/bin:$PATH CUDA_HOME=$cu CUDA_PATH=$cu
export CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$cu/lib:$cu/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath-link,$cu/lib -L $cu/lib -L $cu/lib/stubs"
cargo build --release --features cuda --target-dir target-cuda "$@"
bin=target-cuda/release/kdllm
echo "built $bin ($(du -h "$bin" | cut -f1)); at run time it needs libcuda.so.1 and, on LD_LIBRARY_PATH, the CUDA 13 libraries"

#!/usr/bin/env bash
# Compile the torch-free CUDA sources in csrc/ with the machine's nvcc (sm_80 + sm_90), warnings
# as errors, so kernel breakage shows up in CI without a GPU or a CUDA build of torch.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
    echo "check_cuda_compile: nvcc not found; skipping CUDA compile check"
    exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$NVCC" --version | tail -n 2
for src in csrc/*.cu; do
    obj="$out/$(basename "$src" .cu).o"
    echo "check_cuda_compile: $src"
    # shellcheck disable=SC2046
    "$NVCC" -std=c++20 $(grep -v '^#' csrc/nvcc_flags.txt) -c "$src" -o "$obj" -Icsrc \
        -gencode arch=compute_80,code=sm_80 \
        -gencode arch=compute_90,code=sm_90 \
        -Xcompiler -Wall,-Wextra,-Werror -Werror all-warnings \
        -Xptxas -warn-spills
done
echo "check_cuda_compile: OK"

#!/usr/bin/env bash
# Compile every CUDA kernel for sm_80 and sm_90a with nvcc (no GPU needed) through the project's
# own CMake build in CHECK mode. Fails when nvcc is missing or any file fails to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
command -v nvcc >/dev/null || { echo "cuda-check: nvcc not found" >&2; exit 1; }
BUILD=build/cuda-check
cmake -S . -B "$BUILD" -G Ninja -DFASTADAPT_CUDA=AUTO \
  -DPython_EXECUTABLE="$($PY -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >/dev/null
grep -q "CUDA mode CHECK\|CUDA mode LINK" "$BUILD/CMakeCache.txt" 2>/dev/null || true
cmake --build "$BUILD" --target fastadapt_cuda_kernels
echo "cuda-check: $(ls csrc/cuda/*.cu | wc -l) .cu file(s) compiled for sm_80 and sm_90a"

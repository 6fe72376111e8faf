#!/usr/bin/env bash
# CMAKE_ARGS for building llama-cpp-python on this host: this CPU's vector extensions, never
# Intel AMX. llama.cpp's default build (GGML_NATIVE, -march=native) turns on its AMX matrix
# kernels where the CPU has AMX, and on the Xeon VMs some of these machines are, the first
# decode then dies in ggml_backend_amx_mul_mat with a segmentation fault (llama-cpp-python
# 0.3.36; the worker's llama engine, `python -m llama_cpp.server` and a plain `Llama` alike).
# So the build names each extension itself: AVX2, FMA, F16C and BMI2 (GGML_NATIVE=OFF's
# defaults), plus AVX-VNNI and AVX-512's where /proc/cpuinfo lists them. A CMAKE_ARGS already
# set (a CUDA or Metal build, say) is printed unchanged; so is nothing off x86-64.
set -euo pipefail
if [[ -n "${CMAKE_ARGS:-}" ]]; then
  printf '%s\n' "$CMAKE_ARGS"
  exit 0
fi
if [[ "$(uname -m)" != "x86_64" || ! -r /proc/cpuinfo ]]; then
  exit 0
fi
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
args="-DGGML_NATIVE=OFF"
for pair in avx_vnni:AVX_VNNI avx512f:AVX512 avx512vbmi:AVX512_VBMI \
  avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
  if [[ "$flags" == *" ${pair%%:*} "* ]]; then
    args+=" -DGGML_${pair#*:}=ON"
  fi
done
if [[ "$flags" != *" avx2 "* ]]; then  # an older CPU: leave the vector choice to the defaults
  args+=" -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF"
fi
printf '%s\n' "$args"

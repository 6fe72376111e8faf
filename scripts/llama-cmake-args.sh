#!/usr/bin/env bash
# CMAKE_ARGS for building llama-cpp-python on this host: this CPU's vector extensions, never
# Intel AMX. llama.cpp's default build (GGML_NATIVE, -march=native) turns on its AMX matrix
# kernels where the CPU has AMX, and on the Xeon VMs some of these machines are, the first
# decode then dies in ggml_backend_amx_mul_mat with a segmentation fault (llama-cpp-python
# 0.3.36; the worker's llama engine, `python -m llama_cpp.server` and a plain `Llama` alike).
# So the build names each extension itself, on where /proc/cpuinfo lists it and off where it
# does not (GGML_NATIVE=OFF alone would assume SSE 4.2, AVX, AVX2, FMA, F16C and BMI2). AVX-512
# needs its F, BW, DQ and VL parts together (ggml compiles them as one). A CMAKE_ARGS already
# set (a CUDA or Metal build, say) is printed unchanged; off x86-64, nothing (the default).
set -euo pipefail
if [[ -n "${CMAKE_ARGS:-}" ]]; then
  printf '%s\n' "$CMAKE_ARGS"
  exit 0
fi
if [[ "$(uname -m)" != "x86_64" || ! -r /proc/cpuinfo ]]; then
  exit 0
fi
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() {
  local f
  for f in "$@"; do [[ "$flags" == *" $f "* ]] || return 1; done
}
args="-DGGML_NATIVE=OFF"
for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
  "avx512f avx512bw avx512dq avx512vl:AVX512" avx512vbmi:AVX512_VBMI \
  avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
  # shellcheck disable=SC2086  # the flag list splits on purpose
  if has ${pair%%:*}; then state=ON; else state=OFF; fi
  args+=" -DGGML_${pair#*:}=$state"
done
printf '%s\n' "$args"

#!/usr/bin/env bash
# Rebuild the venv's llama-cpp-python when it carries Intel AMX kernels (see
# scripts/llama-cmake-args.sh for why): a venv made before the build named its extensions, or a
# wheel pip cached from such a build, would otherwise keep crashing on AMX hosts. Usage:
# scripts/llama-no-amx.sh <venv bin dir>. Nothing happens when the installed build has no AMX.
set -euo pipefail
bin="$1"
if ! "$bin/python" - <<'PY' 2>/dev/null; then exit 0; fi
import sys
import llama_cpp
sys.exit(0 if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode() else 1)
PY
version="$("$bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
echo "llama-cpp-python $version was built with AMX kernels: rebuilding it without them (~6 min)"
CMAKE_ARGS="$(bash "$(dirname "$0")/llama-cmake-args.sh")" "$bin/pip" install --quiet \
  --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==$version"

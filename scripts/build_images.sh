#!/usr/bin/env bash
# Build the CPU variant of every service image with buildah (no Docker engine, no registry), as CI does:
#
#   scripts/build_images.sh            # or: make images BUILDER=buildah
#   scripts/build_images.sh --list     # the images it builds: NAME DOCKERFILE TARGET, one a line
#
# What it does, in order:
#   1. makes the base image (the Dockerfiles' BASE_IMAGE) available: scripts/make_base_image.sh pulls
#      it, or makes a stand-in from Debian packages with debootstrap when no registry is reachable;
#   2. builds each image with `buildah bud --layers --isolation chroot --network host`, under the names
#      k8s/base/kustomization.yaml deploys ($REGISTRY$NAME:$IMAGE_TAG). The deps and runtime stages are
#      identical in every Dockerfile, so the layer cache builds them once;
#   3. CI only: when this machine's pip uses a CA bundle (PIP_CERT, or `pip config`'s cert) and a
#      local wheel directory holding the CPU torch wheel (find-links), both are bind-mounted into the
#      build's RUN steps (buildah bud --volume) and passed as the PIP_CERT and PIP_FIND_LINKS build
#      arguments; nothing of them lands in a layer. Without them the images get torch from PyTorch's
#      CPU index, as a user's build does;
#   4. writes $CACHE/report.tsv: name, seconds to build, size (docs/deploy.md quotes it).
#
# Everything lives under $LORAFLEET_IMAGE_CACHE (default: /var/cache/lorafleet/images when writable,
# else .cache/images of the repository; scripts/buildah_storage.sh): buildah's storage (the base and the
# layer cache, reused by every later build on this machine, from any clone) and the report; delete it
# for a cold build. Storage driver: overlay when this machine can mount it (fast: layers are
# not copied), else vfs; LORAFLEET_STORAGE_DRIVER=vfs|overlay forces one. Needs root.
# Settings: REGISTRY (default empty), IMAGE_TAG (0.1.0), TORCH_VARIANT (cpu), BASE_IMAGE (the
# Dockerfiles' default).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REGISTRY="${REGISTRY:-}"
IMAGE_TAG="${IMAGE_TAG:-0.1.0}"
TORCH_VARIANT="${TORCH_VARIANT:-cpu}"

# NAME DOCKERFILE TARGET: what `make images` builds with docker (tests/test_dockerfiles.py compares).
IMAGES=(
    "lorafleet-trainer services/trainer/Dockerfile server"
    "lorafleet-trainer-worker services/trainer/Dockerfile worker"
    "lorafleet-inference services/inference/Dockerfile inference"
    "lorafleet-dashboard services/dashboard/Dockerfile dashboard"
)

if [[ "${1:-}" == --list ]]; then
    printf '%s\n' "${IMAGES[@]}"
    exit 0
fi

die() {
    echo "build_images: ERROR: $*" >&2
    exit 1
}
log() { echo "build_images: $*"; }

[[ "$(id -u)" -eq 0 ]] || die "needs root (buildah with chroot isolation); you are $(id -un)."
bash "$ROOT/scripts/install_buildah.sh" >/dev/null

# shellcheck source=scripts/buildah_storage.sh
source "$ROOT/scripts/buildah_storage.sh"
log "buildah storage: $CACHE/storage ($LORAFLEET_STORAGE_DRIVER)"

BASE_IMAGE="${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' "$ROOT/services/trainer/Dockerfile")}"
[[ -n "$BASE_IMAGE" ]] || die "no ARG BASE_IMAGE=... in services/trainer/Dockerfile"
# buildah resolves a short name to docker.io/library/...; the base is made (or pulled) under that name.
case "$BASE_IMAGE" in
    */*) FULL_BASE="$BASE_IMAGE" ;;
    *) FULL_BASE="docker.io/library/$BASE_IMAGE" ;;
esac
start=$(date +%s)
bash "$ROOT/scripts/make_base_image.sh" "$FULL_BASE"
log "base image ready in $(( $(date +%s) - start )) s"

args=(--build-arg "BASE_IMAGE=$FULL_BASE" --build-arg "TORCH_VARIANT=$TORCH_VARIANT")
# 3. The CI machine's pip settings: its CA bundle and the local wheel of the CPU torch.
pip_setting() {  # the value of a pip setting from the environment, else from `pip config`
    local env="$1" key="$2" value
    value="${!env:-}"
    if [[ -z "$value" ]] && command -v python3 >/dev/null 2>&1; then
        value="$(python3 -m pip config get "global.$key" 2>/dev/null || true)"
    fi
    echo "$value"
}
cert="$(pip_setting PIP_CERT cert)"
if [[ -n "$cert" && -f "$cert" ]]; then
    args+=(--volume "$cert:/run/lorafleet-ci/ca.crt:ro" --build-arg PIP_CERT=/run/lorafleet-ci/ca.crt)
    log "pip CA bundle: $cert"
fi
if [[ "$TORCH_VARIANT" == cpu ]]; then
    for dir in $(pip_setting PIP_FIND_LINKS find-links); do
        wheel="$(ls "$dir"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)"
        if [[ -n "$wheel" ]]; then
            args+=(--volume "$dir:/run/lorafleet-ci/wheels:ro" --build-arg PIP_FIND_LINKS=/run/lorafleet-ci/wheels
                --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
            log "CPU torch wheel: $wheel"
            break
        fi
    done
fi

report="$CACHE/report.tsv"
printf 'image\tbuild_seconds\tsize\n' >"$report.tmp"
for entry in "${IMAGES[@]}"; do
    read -r name dockerfile target <<<"$entry"
    tag="$REGISTRY$name:$IMAGE_TAG"
    log "building $tag ($dockerfile, target $target)"
    t0=$(date +%s)
    logfile="$CACHE/build-$name.log"
    # --format docker: the OCI image config has no HEALTHCHECK field, and buildah drops it with only a
    # warning in its default OCI format (tests/test_images.py checks the images keep theirs).
    if ! buildah_ bud --format docker --layers --isolation chroot --network host --pull=never "${args[@]}" \
        -f "$ROOT/$dockerfile" --target "$target" -t "$tag" "$ROOT" >"$logfile" 2>&1; then
        tail -n 60 "$logfile" >&2
        die "building $tag failed (last lines above; whole log: $logfile)."
    fi
    seconds=$(( $(date +%s) - t0 ))
    size="$(buildah_ images --noheading --format '{{.Size}}' "localhost/$tag" 2>/dev/null | head -n 1 | tr -d ' ' || echo '?')"
    printf '%s\t%s\t%s\n' "$tag" "$seconds" "$size" >>"$report.tmp"
    log "$tag: built in $seconds s"
done
mv "$report.tmp" "$report"
log "all images built in $(( $(date +%s) - start )) s; report: $report"
column -t "$report" 2>/dev/null || cat "$report"

# Sourced by scripts/build_images.sh and scripts/make_base_image.sh (after they set ROOT): CACHE, the
# directory of lorafleet's image builds, the buildah storage under it, and BUILDAH (an array) /
# buildah_ (a function) to call buildah on it. tests/image_utils.py resolves CACHE the same way and
# reads the same files to run the built images.
#
# CACHE: $LORAFLEET_IMAGE_CACHE when set; else the machine-wide /var/cache/lorafleet/images when it can
# be created and written (root), so that every clone on this machine (CI runs `.ci/run` in a fresh
# clone each time) reuses one base image and one layer cache; else .cache/images of the repository.
# An empty or missing directory is a cold start: the base is made again and every layer built.
#
# Driver: overlay when this machine can mount it (layers are shared, not copied: with a layer cache a
# build is several times faster than with vfs), else vfs, which works wherever root does. The choice
# is written to $CACHE/storage-driver so that every later call uses the storage the same way;
# LORAFLEET_STORAGE_DRIVER=vfs|overlay forces one (for a new cache directory).
# shellcheck shell=bash
if [[ -z "${LORAFLEET_IMAGE_CACHE:-}" ]]; then
    LORAFLEET_IMAGE_CACHE=/var/cache/lorafleet/images
    if ! mkdir -p "$LORAFLEET_IMAGE_CACHE" 2>/dev/null || [[ ! -w "$LORAFLEET_IMAGE_CACHE" ]]; then
        LORAFLEET_IMAGE_CACHE="$ROOT/.cache/images"
    fi
fi
export LORAFLEET_IMAGE_CACHE
CACHE="$LORAFLEET_IMAGE_CACHE"
_driver_file="$CACHE/storage-driver"
mkdir -p "$CACHE"
if [[ -z "${LORAFLEET_STORAGE_DRIVER:-}" ]]; then
    if [[ -s "$_driver_file" ]]; then
        LORAFLEET_STORAGE_DRIVER="$(cat "$_driver_file")"
    else
        _probe=(buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver overlay)
        _c="$("${_probe[@]}" from scratch 2>/dev/null || true)"
        if [[ -n "$_c" ]] && "${_probe[@]}" mount "$_c" >/dev/null 2>&1; then
            LORAFLEET_STORAGE_DRIVER=overlay
            "${_probe[@]}" rm "$_c" >/dev/null 2>&1 || true
        else
            LORAFLEET_STORAGE_DRIVER=vfs
            [[ -n "$_c" ]] && "${_probe[@]}" rm "$_c" >/dev/null 2>&1
            umount "$CACHE/storage/overlay" 2>/dev/null || true
            rm -rf "$CACHE/storage" "$CACHE/run"
        fi
    fi
fi
echo "$LORAFLEET_STORAGE_DRIVER" >"$_driver_file"
export LORAFLEET_STORAGE_DRIVER
BUILDAH=(buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver "$LORAFLEET_STORAGE_DRIVER")
buildah_() {
    "${BUILDAH[@]}" "$@"
}

#!/usr/bin/env bash
# `make images`: build images/operator and images/server from their Dockerfiles without Docker and
# without a registry, and import them into the dev cluster's real nodes when a cluster runs them.
#
#   hack/images/build.sh [operator] [server]        (default: both)
#   FLEETSERVE_DEV_CLUSTER_STATE=<state dir>         import into that cluster's real nodes too
#
# Builder: Debian's buildah (daemonless; hack/install-tools.sh image-tools unpacks it with dpkg -x),
# RUN steps in OCI isolation through the real nodes' runc, host network (the build reaches PyPI and the
# Debian mirror as the host does; the host's pip.conf and CA bundle are bind-mounted into RUN steps
# only, never written into an image). Base: a Debian bookworm rootfs made here by mmdebstrap
# (python3, venv, passwd, CA certificates), passed as the Dockerfiles' BASE_IMAGE build argument, so
# the published Dockerfiles keep their usual base.
#
# Cache by content: an image's key is the sha256 of its Dockerfile, the base's key and every file of
# the build context it copies (pyproject.toml pins the Python dependencies); a key already built is
# skipped. Output: $CACHE/images/out/<name>-<key>.tar (OCI archive, image fleetserve.local/<name>:<key>),
# <name>.tar linking the newest, <name>-<key>.json with the build seconds and sizes.
# Disk: no intermediate layers are kept (no --layers: the content key already skips an unchanged
# image, and every source edit invalidates the pip layer that follows the sources' COPY), and a new
# key replaces the older ones of its name (image and archive): a server build holds ~6.5 GB of
# storage + a 3.3 GB archive, where kept layers and superseded keys filled the disk after two builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
tools_py() { PYTHONPATH="$repo/devcluster${PYTHONPATH:+:$PYTHONPATH}" python3 -m fleetserve_devcluster.tools "$@"; }
eval "$(tools_py versions)"
CACHE="$FLEETSERVE_CACHE"
TOOLS="$CACHE/image-tools/$IMAGE_TOOLS"
RUNC="$CACHE/node-runtime/$NODE_RUNTIME/bin/runc"
IMAGES="$CACHE/images"
log() { echo "images: $*"; }
for need in "$TOOLS/.complete" "$RUNC"; do
  [[ -e "$need" ]] || { echo "images: $need is missing; run hack/install-tools.sh node-runtime image-tools" >&2; exit 1; }
done
mkdir -p "$IMAGES/out"
POLICY="$TOOLS/root/etc/containers/policy.json"
buildah() { "$TOOLS/bin/buildah" --root "$IMAGES/storage" --runroot "$IMAGES/run" --storage-driver overlay "$@"; }

# ---------------------------------------------------------------- the base
BASE_PACKAGES="python3,python3-venv,python-is-python3,passwd,ca-certificates"
base_key="$(printf '%s\n' "$IMAGE_TOOLS" bookworm minbase "$BASE_PACKAGES" | sha256sum | cut -c1-16)"
BASE="fleetserve.local/debian:bookworm-$base_key"
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  tar="$IMAGES/base-$base_key.tar"  # mmdebstrap writes a tarball for a name ending in .tar
  if [[ ! -f "$tar" ]]; then
    log "base: mmdebstrap bookworm ($BASE_PACKAGES)..."
    t0=$SECONDS
    "$TOOLS/bin/mmdebstrap" --quiet --variant=minbase --include="$BASE_PACKAGES" \
      --aptopt='APT::Sandbox::User "root"' bookworm "${tar%.tar}.tmp.tar" \
      "deb http://deb.debian.org/debian bookworm main" "deb http://deb.debian.org/debian bookworm-updates main" \
      "deb http://deb.debian.org/debian-security bookworm-security main"
    mv "${tar%.tar}.tmp.tar" "$tar"
    log "base: rootfs in $((SECONDS - t0)) s, $(du -m "$tar" | cut -f1) MiB"
  fi
  c="$(buildah from --signature-policy "$POLICY" scratch)"
  buildah add "$c" "$tar" / >/dev/null
  buildah config --cmd /bin/bash "$c"
  buildah commit --signature-policy "$POLICY" -q "$c" "$BASE" >/dev/null
  buildah rm "$c" >/dev/null
  log "base: $BASE"
fi

# ---------------------------------------------------------------- the images
mounts=()
for f in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf; do [[ -f "$f" ]] && mounts+=(-v "$f:$f:ro"); done
context_key() {  # $1: Dockerfile
  { echo "$base_key"; sha256sum "$1"
    find pyproject.toml README.md cli operator server devcluster router -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}
want=("$@"); [[ ${#want[@]} == 0 ]] && want=(operator server)
for name in "${want[@]}"; do
  dockerfile="images/$name/Dockerfile"
  [[ -f "$dockerfile" ]] || { echo "images: no $dockerfile" >&2; exit 2; }
  key="$(context_key "$dockerfile")"
  out="$IMAGES/out/$name-$key.tar"
  if [[ -f "$out" ]]; then
    log "$name: cached ($out)"
  else
    log "$name: building $dockerfile on $BASE..."
    t0=$SECONDS
    buildah bud --signature-policy "$POLICY" --isolation oci --runtime "$RUNC" --network host --pull-never \
      --security-opt seccomp=unconfined "${mounts[@]}" --build-arg "BASE_IMAGE=$BASE" \
      -f "$dockerfile" -t "fleetserve.local/$name:$key" . >"$IMAGES/out/$name-$key.log" 2>&1 \
      || { tail -30 "$IMAGES/out/$name-$key.log" >&2; exit 1; }
    seconds=$((SECONDS - t0))
    rm -f "$out.tmp"
    buildah push --signature-policy "$POLICY" -q "fleetserve.local/$name:$key" \
      "oci-archive:$out.tmp:fleetserve.local/$name:$key" >/dev/null
    mv "$out.tmp" "$out"
    printf '{"image": "fleetserve.local/%s:%s", "build_seconds": %d, "archive_bytes": %d}\n' \
      "$name" "$key" "$seconds" "$(stat -c %s "$out")" > "$IMAGES/out/$name-$key.json"
    log "$name: built in ${seconds} s, archive $(du -m "$out" | cut -f1) MiB ($out)"
  fi
  ln -sfn "$name-$key.tar" "$IMAGES/out/$name.tar"
  for old in "$IMAGES/out/$name"-*.tar; do
    old_key="${old##*/$name-}"; old_key="${old_key%.tar}"
    [[ "$old_key" == "$key" || ! "$old_key" =~ ^[0-9a-f]{16}$ ]] && continue
    buildah rmi "fleetserve.local/$name:$old_key" >/dev/null 2>&1 || true
    rm -f "$IMAGES/out/$name-$old_key".{tar,json,log}
    log "$name: removed the superseded $old_key"
  done
  if [[ -n "${FLEETSERVE_DEV_CLUSTER_STATE:-}" ]]; then
    PYTHONPATH="$repo/devcluster" python3 -m fleetserve_devcluster.realnodes import "$FLEETSERVE_DEV_CLUSTER_STATE" "$out"
  fi
done

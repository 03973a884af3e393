#!/usr/bin/env bash
# make_base_image.sh [--image NAME] [--suite SUITE] [--mirror URL] [--force]
#
# Builds the Docker base image of docker/Dockerfile locally, for machines that reach the
# Debian archive but no image registry. Does nothing when the image already exists (a user
# with a registry can simply `docker pull debian:bookworm-slim` instead).
#
#   --image NAME   image to create (default debian:bookworm-slim, the Dockerfile's BASE_IMAGE)
#   --suite SUITE  Debian suite (default bookworm)
#   --mirror URL   Debian archive to bootstrap from; default: the one this machine's apt
#                  sources name (/etc/apt/sources.list, /etc/apt/sources.list.d/*), else
#                  $FEDSLICE_DEBIAN_MIRROR, else http://deb.debian.org/debian
#   --force        rebuild even if the image exists
#
# How: `debootstrap --variant=minbase` into a temporary directory, slimmed like Debian's
# -slim images (no docs, man pages or locales; apt keeps no package lists or .debs), with apt
# sources pointing at the same archive (and its security archive, when the machine has one)
# so that `apt-get` inside `docker build` reaches what the host reaches; then `docker import`.
# Needs root (debootstrap) and a running Docker engine. Takes about a minute.
set -euo pipefail

say() { echo "make_base_image: $*"; }
die() { echo "make_base_image: error: $*" >&2; exit 1; }
usage() { sed -n '2,3s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

image=debian:bookworm-slim
suite=bookworm
mirror=""
force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) [[ $# -ge 2 ]] || usage; image=$2; shift 2 ;;
    --suite) [[ $# -ge 2 ]] || usage; suite=$2; shift 2 ;;
    --mirror) [[ $# -ge 2 ]] || usage; mirror=$2; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "make_base_image: unknown argument $1" >&2; usage ;;
  esac
done
[[ "$suite" =~ ^[a-z]+$ ]] || die "--suite must be a Debian code name such as bookworm, got '$suite'"

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker/engine.sh starts one)"
if [[ $force == 0 ]] && docker image inspect "$image" >/dev/null 2>&1; then
  say "$image already exists; nothing to do (--force rebuilds it)"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root; run this script as root (or docker pull $image)"

# apt_uri_for SUITE: the first archive URI this machine's apt sources use for SUITE, in either
# the one-line format (*.list) or deb822 (*.sources). Disabled entries are skipped.
apt_uri_for() {
  local want=$1 f found
  shopt -s nullglob
  found=$(for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r "$f" ]] || continue
    # deb [options] URI SUITE COMPONENTS...
    awk -v want="$want" '
      $1 == "deb" {
        i = 2
        if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == want) { print $i; exit }
      }' "$f"
  done)
  [[ -n "$found" ]] || found=$(for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    # Paragraphs of "Field: value"; a paragraph with Types deb and SUITE among its Suites.
    awk -v want="$want" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && enabled != "no" && (" " suites " ") ~ (" " want " ") && uris != "") {
          split(uris, u, " "); print u[1]; found = 1; exit
        }
        types = ""; suites = ""; uris = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      {
        key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
        if (key == "types") types = $0
        else if (key == "suites") suites = $0
        else if (key == "uris") uris = $0
        else if (key == "enabled") enabled = tolower($0)
      }
      END { if (!found) flush() }' "$f"
  done)
  [[ -n "$found" ]] || return 1
  echo "${found%%$'\n'*}"
}

if [[ -z "$mirror" ]]; then
  mirror=$(apt_uri_for "$suite" || true)
  if [[ -z "$mirror" ]]; then
    mirror=${FEDSLICE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    say "no apt source for '$suite' on this machine; using $mirror"
  fi
fi
security=$(apt_uri_for "$suite-security" || true)
[[ "$mirror" =~ ^https?:// ]] || die "mirror '$mirror' is not an http(s) URL"
say "bootstrapping $suite (minbase) from $mirror${security:+ (security: $security)}"

if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
    >/dev/null || die "apt-get install debootstrap failed"
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -s "$keyring" ]] || die "$keyring is missing (Debian package debian-archive-keyring)"

work=$(mktemp -d /var/tmp/fedslice-base.XXXXXX)
cleanup() {
  # debootstrap may leave /proc or /sys mounted in the target after a failure.
  for m in proc sys dev/pts dev; do umount -l "$work/rootfs/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
rootfs=$work/rootfs

include=()
# apt needs CA certificates to reach an https archive from inside the image.
[[ "$mirror$security" == *https://* ]] && include=(--include=ca-certificates)
start=$SECONDS
if ! debootstrap --variant=minbase --keyring="$keyring" "${include[@]}" "$suite" "$rootfs" \
     "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 20 "$work/debootstrap.log" >&2
  die "debootstrap failed (log above)"
fi

# The image's apt sources: the same archive as the host, deb822 as in Debian's own images.
rm -f "$rootfs/etc/apt/sources.list"
{
  echo "Types: deb"
  echo "URIs: $mirror"
  echo "Suites: $suite $suite-updates"
  echo "Components: main"
  echo "Signed-By: $keyring"
  if [[ -n "$security" ]]; then
    echo
    echo "Types: deb"
    echo "URIs: $security"
    echo "Suites: $suite-security"
    echo "Components: main"
    echo "Signed-By: $keyring"
  fi
} >"$rootfs/etc/apt/sources.list.d/debian.sources"

# Slim like Debian's -slim images: later package installs skip docs, man pages and locales;
# apt keeps no .debs and no package lists in layers.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log \
  "$rootfs"/tmp/* "$rootfs"/var/tmp/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
  -exec rm -rf {} + 2>/dev/null || true
# A container gets its hostname and resolv.conf from the engine.
: >"$rootfs/etc/resolv.conf"
echo localhost >"$rootfs/etc/hostname"

say "importing as $image"
tar --numeric-owner --xattrs -C "$rootfs" -c . |
  docker import \
    --change 'CMD ["bash"]' \
    --change "LABEL org.fedslice.base=debootstrap org.fedslice.suite=$suite" \
    --message "debootstrap --variant=minbase $suite $mirror (docker/make_base_image.sh)" \
    - "$image" >/dev/null || die "docker import failed"
size=$(docker image inspect -f '{{.Size}}' "$image")
say "built $image in $((SECONDS - start)) s ($((size / 1024 / 1024)) MiB)"

#!/bin/sh
# Entry point of the FedSlice image: optional traffic shaping, then the program as a non-root
# user.
#
# The image runs as user fedslice. Shaping the container's link needs root with NET_ADMIN for
# the tc call only, so a shaped container is started as root (`--user 0 --cap-add NET_ADMIN`)
# and this script drops to the unprivileged user, with no capabilities left, before it runs
# the program:
#
#   FEDSLICE_NETEM="delay 40ms 5ms rate 20mbit"   tc netem arguments (latency, jitter, loss,
#                                                 rate); needs the kernel's sch_netem
#   FEDSLICE_RATE=20mbit                          bandwidth only, with tc tbf (works on kernels
#                                                 without netem); with FEDSLICE_NETEM it is
#                                                 added below netem
#   FEDSLICE_SHAPE_DEV=eth0                       interface to shape (default eth0)
#   FEDSLICE_RUN_AS=uid:gid                       user to run as when started as root
#                                                 (default fedslice)
#
# Shaping applies to what the container sends (egress); a link between two shaped containers
# is shaped at both ends.
set -eu

die() {
  echo "fedslice-entrypoint: $*" >&2
  exit 1
}

if [ -n "${FEDSLICE_NETEM:-}" ] || [ -n "${FEDSLICE_RATE:-}" ]; then
  [ "$(id -u)" = 0 ] ||
    die "traffic shaping needs the container started with --user 0 --cap-add NET_ADMIN" \
        "(the program itself still runs as an unprivileged user)"
  dev=${FEDSLICE_SHAPE_DEV:-eth0}
  parent="root"
  if [ -n "${FEDSLICE_NETEM:-}" ]; then
    # shellcheck disable=SC2086  # the value is a list of tc arguments
    if ! err=$(tc qdisc replace dev "$dev" root handle 1: netem $FEDSLICE_NETEM 2>&1); then
      case "$err" in
        *"unknown"*|*"No such file"*|*"not supported"*)
          die "tc netem failed on $dev: $err -- this kernel has no sch_netem" \
              "(CONFIG_NET_SCH_NETEM); FEDSLICE_RATE shapes bandwidth without it" ;;
        *) die "tc netem '$FEDSLICE_NETEM' failed on $dev: $err" ;;
      esac
    fi
    parent="parent 1:1"
  fi
  if [ -n "${FEDSLICE_RATE:-}" ]; then
    # burst: at least one MTU-sized packet per timer tick; latency bounds the queue.
    # shellcheck disable=SC2086
    err=$(tc qdisc replace dev "$dev" $parent handle 10: tbf rate "$FEDSLICE_RATE" \
          burst 32kbit latency 400ms 2>&1) ||
      die "tc tbf rate '$FEDSLICE_RATE' failed on $dev: $err"
  fi
  echo "fedslice-entrypoint: shaped $dev: $(tc qdisc show dev "$dev" | tr '\n' ';')" >&2
fi

if [ "$(id -u)" = 0 ]; then
  run_as=${FEDSLICE_RUN_AS:-fedslice}
  uid=${run_as%%:*}
  gid=${run_as#*:}
  [ "$gid" != "$run_as" ] || gid=$(id -g "$uid") || die "unknown user $uid"
  # No root, no capabilities (NET_ADMIN included) for the program.
  exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all \
    --bounding-set=-all -- "$@"
fi
exec "$@"

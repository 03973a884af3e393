#!/usr/bin/env bash
# make_certs.sh OUT_DIR [N_CLIENTS] [--names a,b,c] [--force] [--days N]
#
# FOR DEVELOPMENT AND TESTING ONLY. Creates a throw-away certificate authority and the
# certificates a FedSlice run needs for mutual TLS, with the openssl CLI:
#
#   OUT_DIR/ca.pem, ca.key                    development CA (ECDSA P-256), CN=FedSlice Dev CA
#   OUT_DIR/coordinator.pem, coordinator.key  CN=fedslice-coordinator,
#                                             SAN DNS:fedslice-coordinator, DNS:localhost,
#                                             DNS:coordinator, IP:127.0.0.1, IP:::1
#   OUT_DIR/<name>.pem, <name>.key            one per client: CN=<name>, SAN DNS:<name>,
#                                             DNS:localhost, IP:127.0.0.1, IP:::1
#
# Clients are named client-0 .. client-(N-1) (N defaults to 4), or as given by --names.
# Every leaf certificate has basicConstraints CA:FALSE, keyUsage digitalSignature, and both
# extendedKeyUsage serverAuth and clientAuth: clients also serve as pipeline stages.
#
# Idempotent: an existing CA is kept (so certificates issued earlier stay valid) and an
# existing leaf is kept when it verifies against that CA; everything missing is created.
# --force recreates the CA and every certificate. Private keys are written with mode 0600.
#
# A real deployment needs keys generated on each device and certificates issued by an
# operated CA with revocation; nothing here provides that.
set -euo pipefail

usage() {
  sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "make_certs: $*" >&2
  exit 1
}

out_dir=""
n_clients=""
names_csv=""
force=0
days=825
while [[ $# -gt 0 ]]; do
  case "$1" in
    --names) [[ $# -ge 2 ]] || usage; names_csv="$2"; shift 2 ;;
    --names=*) names_csv="${1#--names=}"; shift ;;
    --force) force=1; shift ;;
    --days) [[ $# -ge 2 ]] || usage; days="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "make_certs: unknown option $1" >&2; usage ;;
    *)
      if [[ -z "$out_dir" ]]; then out_dir="$1"
      elif [[ -z "$n_clients" ]]; then n_clients="$1"
      else usage
      fi
      shift ;;
  esac
done
[[ -n "$out_dir" ]] || usage
[[ "$days" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive integer, got '$days'"

command -v openssl >/dev/null 2>&1 ||
  die "openssl not found; install it (Debian: apt-get install openssl)"

names=()
if [[ -n "$names_csv" ]]; then
  IFS=',' read -r -a names <<<"$names_csv"
  if [[ -n "$n_clients" && "$n_clients" != "${#names[@]}" ]]; then
    die "N_CLIENTS ($n_clients) does not match the ${#names[@]} names given with --names"
  fi
else
  n_clients=${n_clients:-4}
  [[ "$n_clients" =~ ^[0-9]+$ ]] || die "N_CLIENTS must be a non-negative integer, got '$n_clients'"
  for ((i = 0; i < n_clients; i++)); do names+=("client-$i"); done
fi
for name in "${names[@]}"; do
  # Names become CNs, DNS SANs and file names: keep them to DNS label characters.
  [[ "$name" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$ ]] ||
    die "client name '$name' must be 1-63 characters of [A-Za-z0-9.-], starting alphanumeric"
  [[ "$name" != "ca" && "$name" != "coordinator" ]] || die "client name '$name' is reserved"
done

mkdir -p "$out_dir" || die "cannot create $out_dir"
out_dir=$(cd "$out_dir" && pwd)
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

new_key() {  # new_key FILE
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>"$tmp/err" ||
    die "generating key $1 failed: $(cat "$tmp/err")"
  chmod 600 "$1"
}

ca_key="$out_dir/ca.key"
ca_pem="$out_dir/ca.pem"
if [[ $force == 1 || ! -s "$ca_key" || ! -s "$ca_pem" ]]; then
  echo "make_certs: creating development CA in $out_dir"
  new_key "$ca_key"
  openssl req -new -x509 -key "$ca_key" -sha256 -days "$((days + 365))" \
    -subj "/O=FedSlice Development/CN=FedSlice Dev CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$ca_pem" 2>"$tmp/err" || die "creating the CA certificate failed: $(cat "$tmp/err")"
  chmod 644 "$ca_pem"
  force=1  # leaves signed by an older CA are useless now
else
  echo "make_certs: keeping existing CA $ca_pem"
fi

# issue NAME CN SAN: OUT_DIR/NAME.{key,pem} signed by the CA.
issue() {
  local name="$1" cn="$2" san="$3"
  local key="$out_dir/$name.key" pem="$out_dir/$name.pem"
  if [[ $force == 0 && -s "$key" && -s "$pem" ]] &&
     openssl verify -CAfile "$ca_pem" "$pem" >/dev/null 2>&1; then
    echo "make_certs: keeping $name.pem"
    return
  fi
  new_key "$key"
  cat >"$tmp/$name.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EOF
  openssl req -new -key "$key" -subj "/O=FedSlice Development/CN=$cn" -out "$tmp/$name.csr" \
    2>"$tmp/err" || die "creating the request for $name failed: $(cat "$tmp/err")"
  # A random serial per certificate: reissued certificates never share one.
  openssl x509 -req -in "$tmp/$name.csr" -CA "$ca_pem" -CAkey "$ca_key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days" \
    -extfile "$tmp/$name.ext" -out "$pem" 2>"$tmp/err" ||
    die "signing the certificate for $name failed: $(cat "$tmp/err")"
  chmod 644 "$pem"
  echo "make_certs: issued $name.pem (CN=$cn)"
}

issue coordinator fedslice-coordinator \
  "DNS:fedslice-coordinator,DNS:localhost,DNS:coordinator,IP:127.0.0.1,IP:::1"
for name in "${names[@]}"; do
  issue "$name" "$name" "DNS:$name,DNS:localhost,IP:127.0.0.1,IP:::1"
done
echo "make_certs: done (${#names[@]} clients) in $out_dir -- FOR DEVELOPMENT ONLY"

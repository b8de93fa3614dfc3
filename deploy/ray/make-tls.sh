#!/bin/sh
# TLS for the Ray cluster: a certificate authority of the lab's own, and key pairs it signs.
#   deploy/ray/make-tls.sh NAME HOST|IP [HOST|IP ...]
# writes, in $PNN_TLS_DIR (default ~/.pnn-cluster/tls):
#   NAME.key  the key (mode 600)                  NAME.crt  its certificate, for the names and addresses given
#   ca.crt    the CA's certificate (every node and client trusts it)           and for localhost and 127.0.0.1
# The CA's own key is made once, in $PNN_CA_DIR (default ~/.pnn-cluster-ca, mode 700): it never leaves the machine
# you manage the cluster from (keep it outside ~/.pnn-cluster, which `ray up` and step 5 copy to every node).
# Used twice (deploy/README.md, step 1):
#   make-tls.sh ray EVERY-NODE-NAME-AND-ADDRESS...    Ray's gRPC (RAY_USE_TLS, RAY_TLS_SERVER_CERT/KEY, RAY_TLS_CA_CERT)
#   PNN_TLS_DIR=~/.pnn-cluster-ca/dashboard make-tls.sh dashboard ray-head.lab.example
#                                                     the HTTPS proxy on the head (dashboard-proxy.conf); its key goes
#                                                     to the head only, so not into ~/.pnn-cluster, which every node gets
# A key that exists is kept (the script stops): remove NAME.key and NAME.crt to make new ones.
set -eu
name=${1:?usage: make-tls.sh NAME HOST|IP [HOST|IP ...]}
shift
[ $# -gt 0 ] || { echo "make-tls.sh: give the names and addresses $name serves (every node's, for cluster)" >&2; exit 2; }
case $name in *[!A-Za-z0-9_-]*) echo "make-tls.sh: NAME $name: letters, digits, - and _ only" >&2; exit 2 ;; esac
tls=${PNN_TLS_DIR:-$HOME/.pnn-cluster/tls}
ca=${PNN_CA_DIR:-$HOME/.pnn-cluster-ca}
umask 077
mkdir -p "$tls" "$ca"
chmod 700 "$tls" "$ca"
if [ -e "$tls/$name.key" ]; then
    echo "make-tls.sh: $tls/$name.key exists; kept (remove it and $name.crt to make a new pair)" >&2
    exit 1
fi
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
if [ ! -e "$ca/ca.key" ]; then
    # shellcheck disable=SC2086
    openssl req -x509 $ec -days 3650 -subj "/CN=pnn lab CA" -keyout "$ca/ca.key" -out "$ca/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    echo "made the lab CA: $ca/ca.key (stays here) and $ca/ca.crt"
fi
san="DNS:localhost,IP:127.0.0.1"
for host in "$@"; do
    case $host in
        *:* | *[0-9].*[0-9]) case $host in *[!0-9a-fA-F.:]*) san="$san,DNS:$host" ;; *) san="$san,IP:$host" ;; esac ;;
        *) san="$san,DNS:$host" ;;
    esac
done
ext=$(mktemp)
trap 'rm -f "$ext" "$tls/$name.csr"' EXIT
# the same pair is a server's and a client's: Ray's gRPC is mutual TLS
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$san" > "$ext"
# shellcheck disable=SC2086
openssl req $ec -subj "/CN=$name" -keyout "$tls/$name.key" -out "$tls/$name.csr" 2>/dev/null
openssl x509 -req -in "$tls/$name.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial -days 825 \
    -extfile "$ext" -out "$tls/$name.crt" 2>/dev/null
cp "$ca/ca.crt" "$tls/ca.crt"
chmod 600 "$tls/$name.key"
chmod 644 "$tls/$name.crt" "$tls/ca.crt"
echo "wrote $tls/$name.key (mode 600), $tls/$name.crt ($san) and $tls/ca.crt"

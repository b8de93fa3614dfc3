#!/bin/sh
# The MLflow server's secrets, made once on the server machine, readable by root only (what exists is kept):
#   /etc/pnn-cluster/mlflow/mlflow.env   MLFLOW_FLASK_SERVER_SECRET_KEY (the basic-auth app's CSRF key; the server
#                                        does not start without it), MLFLOW_AUTH_ADMIN_PASSWORD (the admin account's
#                                        password, used when the server first starts) and PGPASSWORD (the password
#                                        of the PostgreSQL role mlflow, which libpq reads for both databases)
#   /etc/pnn-cluster/mlflow/tls.key      a self-signed TLS certificate for HOST (and the other names or IP addresses);
#   /etc/pnn-cluster/mlflow/tls.crt      clients trust tls.crt through MLFLOW_TRACKING_SERVER_CERT_PATH
# mlflow-server.service reads mlflow.env as an EnvironmentFile and hands tls.key and tls.crt to the server as
# systemd credentials, so the mlflow user never reads this directory. With --postgres, the role's password is set
# to PGPASSWORD's (through psql's standard input, never on a command line).
#   sudo deploy/mlflow/install-secrets.sh [--postgres] HOST [NAME_OR_IP ...]
# PNN_ETC (default /etc/pnn-cluster) moves the whole tree, e.g. to rehearse as an ordinary user.
set -eu
postgres=no
if [ "${1:-}" = "--postgres" ]; then postgres=yes; shift; fi
host=${1:?usage: install-secrets.sh [--postgres] HOST [NAME_OR_IP ...]}
shift
dir=${PNN_ETC:-/etc/pnn-cluster}/mlflow
(umask 022 && mkdir -p "${dir%/*}")   # the parent stays readable: other services keep files there
umask 077
mkdir -p "$dir"
chmod 700 "$dir"

env=$dir/mlflow.env
touch "$env"
chmod 600 "$env"
# KEY=random hex, unless mlflow.env has KEY already (printf is the shell's own: the value is on no command line)
add() {
    if ! grep -q "^$1=" "$env"; then
        printf '%s=%s\n' "$1" "$(openssl rand -hex "$2")" >> "$env"
        echo "added $1 to $env"
    fi
}
add MLFLOW_FLASK_SERVER_SECRET_KEY 32
add MLFLOW_AUTH_ADMIN_PASSWORD 16
add PGPASSWORD 24

if [ ! -e "$dir/tls.crt" ]; then
    san="DNS:$host"
    for name in "$@"; do
        case $name in
            *:* | *[0-9].*[0-9]) case $name in *[!0-9a-fA-F.:]*) san="$san,DNS:$name" ;; *) san="$san,IP:$name" ;; esac ;;
            *) san="$san,DNS:$name" ;;
        esac
    done
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 -subj "/CN=$host" \
        -addext "subjectAltName=$san" -keyout "$dir/tls.key" -out "$dir/tls.crt.new" 2>/dev/null
    mv "$dir/tls.crt.new" "$dir/tls.crt"
    echo "wrote $dir/tls.key and $dir/tls.crt ($san); copy tls.crt to every client"
fi
if [ "$postgres" = yes ]; then
    # ALTER ROLE ... PASSWORD 'hex': the password is hexadecimal, so it needs no quoting
    sed -n 's/^PGPASSWORD=//p' "$env" | { read -r pw; printf "ALTER ROLE mlflow WITH LOGIN PASSWORD '%s';\n" "$pw"; } \
        | runuser -u postgres -- psql -q -v ON_ERROR_STOP=1
    echo "set the password of PostgreSQL role mlflow"
fi

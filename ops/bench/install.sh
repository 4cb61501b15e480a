#!/usr/bin/env bash
# What `make bench` needs beyond `make setup`: nginx's nchan module (Debian's
# libnginx-mod-nchan) and the Python peer in its own venv (.run/bench/peer-venv,
# from ops/bench/peer-requirements.txt). Installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "make bench needs nginx's nchan module: apt-get install -y libnginx-mod-nchan (as root)" >&2
        exit 1
    fi
    echo "Installing Debian package: libnginx-mod-nchan"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libnginx-mod-nchan >/dev/null
fi
command -v taskset >/dev/null 2>&1 || echo "taskset (util-linux) is missing: servers will not be pinned" >&2

venv=.run/bench/peer-venv
stamp=$venv/.installed
if [ ! -f "$stamp" ] || [ ops/bench/peer-requirements.txt -nt "$stamp" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -r ops/bench/peer-requirements.txt
    touch "$stamp"
fi

#!/usr/bin/env bash
# Installs what Herald needs from Debian's packages, and only what is missing:
# python3-venv (for the project's .venv), redis-server and nginx (used by the
# Redis and cluster tests and by `make cluster`), chromium (the test that
# renders the load tool's HTML report in a real browser), gcc with cJSON
# (the load tool's compiled worker), and prometheus with promtool (`make
# cluster OBSERVE=1` and the tests that scrape a cluster). Safe to run repeatedly.
set -euo pipefail

missing=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# The load tool's compiled subscriber worker (--client native, used by `make bench`).
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
[ -f /usr/include/cjson/cJSON.h ] || missing+=(libcjson-dev)
# Prometheus beside `make cluster OBSERVE=1`, and promtool for checking its config and rules (one package).
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
# The certificate of `make cluster TLS=1` (and of the tests of the front's HTTPS).
command -v openssl >/dev/null 2>&1 || missing+=(openssl)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "Herald needs these Debian packages: ${missing[*]}" >&2
    echo "Install them as root: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "Installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages' own services are not used: Herald starts its own on free ports.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now redis-server nginx prometheus >/dev/null 2>&1 || true
fi

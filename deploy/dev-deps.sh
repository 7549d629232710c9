#!/usr/bin/env bash
# Installs the system packages the demo and the tests need (Debian/Ubuntu): the mosquitto broker,
# systemd for systemd-analyze (tests/test_systemd_unit.py checks the service unit with it), and
# shellcheck (tests/test_install.py lints deploy/install.sh with it).
set -euo pipefail
missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    missing+=(mosquitto)
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    missing+=(systemd)
fi
if ! command -v shellcheck >/dev/null 2>&1; then
    missing+=(shellcheck)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing ${missing[*]} (for the demo and tests)..." >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# mosquitto enables a system broker on port 1883; the gateway's demo and tests start their own. systemd is
# only a package here: nothing starts it, systemd-analyze works without a running systemd.

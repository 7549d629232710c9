#!/usr/bin/env bash
# Installs the system packages the demo and the tests need (Debian/Ubuntu): the mosquitto broker.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing mosquitto (MQTT broker for the demo and tests)..." >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
# The package enables a system broker on port 1883; the gateway's demo and tests start their own.

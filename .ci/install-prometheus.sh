#!/usr/bin/env bash
# Install Debian's prometheus package (prometheus + promtool) for tests/ops, if missing.
# Idempotent; never starts the service (the tests start their own server on 127.0.0.1).
# `ray metrics launch-prometheus` downloads from the internet and is not usable offline.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus already installed: $(prometheus --version 2>&1 | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# policy-rc.d exit 101 keeps the package's postinst from starting the service in containers that
# have an init system; restore whatever was there before.
POLICY=/usr/sbin/policy-rc.d
restore_policy() { :; }
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    restore_policy() { $SUDO rm -f "$POLICY"; }
fi
trap restore_policy EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus

command -v promtool >/dev/null
echo "installed: $(prometheus --version 2>&1 | head -n 1)"

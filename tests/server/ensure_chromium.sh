#!/usr/bin/env bash
# Install Debian's headless-capable Chromium when /usr/bin/chromium is missing (the page test
# needs it). Runs as root on the project's machines; prints why when it cannot install.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "chromium is missing and this user cannot apt-get install it (run as root:" \
         "apt-get update && apt-get install -y chromium)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
test -x /usr/bin/chromium

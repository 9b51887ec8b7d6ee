#!/usr/bin/env bash
# Install the Debian tools the test suite and the benchmarks drive, when they are missing.
# Each line: a shell test that passes when the tool is there, and the package that provides it.
set -euo pipefail
checks=(
  "command -v curl|curl"
  "command -v openssl|openssl"
  "test -x /usr/sbin/nginx|nginx"
  "test -e /usr/lib/nginx/modules/ngx_stream_module.so|libnginx-mod-stream"
  "test -x /usr/sbin/apache2 && test -e /usr/lib/apache2/modules/mod_http2.so|apache2"
  "command -v h2load|nghttp2-client"
  "command -v chromium|chromium"
  "fc-list :lang=zh 2>/dev/null | grep -q .|fonts-wqy-microhei"
  "command -v systemd-analyze|systemd"
  "command -v ip|iproute2"
  "command -v nft|nftables"
  "command -v setpriv|util-linux"
  "command -v iptables && command -v ip6tables|iptables"
  "test -x /usr/sbin/dnsmasq|dnsmasq-base"
  "command -v promtool|prometheus"
  "command -v podman|podman"
  "command -v runc|runc"
  "command -v mmdebstrap|mmdebstrap"
  "ls /usr/lib/postgresql/*/bin/initdb|postgresql"
  "test -x /usr/sbin/pgbouncer|pgbouncer"
)
missing=()
for entry in "${checks[@]}"; do
  bash -c "${entry%|*}" >/dev/null 2>&1 || missing+=("${entry##*|}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

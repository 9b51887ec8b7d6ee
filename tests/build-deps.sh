#!/usr/bin/env bash
# Install what compiling the HTTP engine needs, when it is missing: a C compiler and the headers of
# the Python that builds it (Debian's python3-dev for Debian's python3; pyenv and the official
# images carry their own). Usage: build-deps.sh PYTHON
set -euo pipefail
python=${1:-python3}
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -e "$include/Python.h" ] || missing+=(python3-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing Debian packages to build the HTTP engine: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Make the image's base from Debian's own packages, for machines that reach a Debian mirror but no
# registry of images (docs/deployment.md, "The image"): Debian bookworm, minbase, with python3 and
# python3-venv, imported into podman's storage as localhost/icpgate-base:<release>-<key>. The key is
# a hash of this file, which holds the release, the package list and every option, so a base is made
# once per machine and reused (podman keeps it in its storage) until this file changes.
# Prints the image's name. Needs root (mmdebstrap --mode=root), mmdebstrap and podman.
#   make image BASE=$(bash tests/debian-base.sh)
set -euo pipefail
RELEASE=bookworm
PACKAGES=python3,python3-venv
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
key=$(sha256sum "$0" | cut -c1-12)
name=localhost/icpgate-base:$RELEASE-$key
if podman image exists "$name"; then
  echo "$name"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Documentation, manual pages and translations are left out: nothing in the image reads them.
mmdebstrap --quiet --mode=root --variant=minbase --include="$PACKAGES" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  "$RELEASE" "$work/base.tar" \
  "deb $MIRROR $RELEASE main" "deb $MIRROR $RELEASE-updates main" "deb $SECURITY $RELEASE-security main" >&2
podman import --quiet --change 'CMD ["/bin/bash"]' "$work/base.tar" "$name" >/dev/null
echo "$name"

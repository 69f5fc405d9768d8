#!/usr/bin/env bash
# Build the local base image that stands in for python:3.11-slim where no public registry is reachable:
# a Debian bookworm root made by debootstrap from the Debian archive, imported with `docker import`.
#   infra/scripts/build_base_image.sh WORKDIR     -> prints the image name (transfer-pipeline/base:bookworm-<debian>-py<python>)
# Needs root, debootstrap and a reachable Docker daemon (DOCKER_HOST). The rootfs is deleted afterwards.
set -euo pipefail
workdir=${1:?usage: build_base_image.sh WORKDIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
rootfs="$workdir/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"
# minbase: dpkg/apt and essentials only. python3-venv brings ensurepip (pip for the build stage's venv);
# git + tini are what the worker images run; no compiler is installed.
nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,git,tini,procps \
  "$suite" "$rootfs" "$mirror" > "$workdir/debootstrap.log" 2>&1 || { tail -20 "$workdir/debootstrap.log" >&2; exit 1; }
# Keep the image small and reproducible: no apt lists, caches or docs.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
  "$rootfs"/var/log/*.log "$rootfs"/tmp/*
debian=$(cat "$rootfs/etc/debian_version")
python=$(chroot "$rootfs" python3 -c 'import platform; print(platform.python_version())')
image="transfer-pipeline/base:bookworm-${debian}-py${python}"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $suite minbase ($mirror)" - "$image" >/dev/null
rm -rf "$rootfs"
echo "$image"

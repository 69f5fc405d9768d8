#!/usr/bin/env bash
# Build the local base image that stands in for python:3.11-slim where no public registry is reachable:
# a Debian bookworm root made by debootstrap from the Debian archive, with a CPython 3.11 installed in
# /usr/local as in the public image, imported with `docker import`.
#   infra/scripts/build_base_image.sh WORKDIR [PYTHON_PREFIX]
#     -> prints the image name, transfer-pipeline/base:bookworm-<debian>-py<python>
# PYTHON_PREFIX: a CPython >= 3.11.4 built for this Debian release (default: the prefix of `python3` on
# PATH, e.g. a pyenv build). Debian bookworm's own python3 is 3.11.2, below the project's floor (3.11.4:
# tarfile extraction filters), so it is not used. Needs root, debootstrap and a Docker daemon (DOCKER_HOST).
set -euo pipefail
workdir=${1:?usage: build_base_image.sh WORKDIR [PYTHON_PREFIX]}
prefix=${2:-$(python3 -c 'import sys; print(sys.base_prefix)')}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
rootfs="$workdir/rootfs"
pyver=$("$prefix/bin/python3" -c 'import platform; print(platform.python_version())')
"$prefix/bin/python3" -c 'import sys, tarfile; assert sys.version_info[:2] == (3, 11) and sys.version_info >= (3, 11, 4) and hasattr(tarfile, "data_filter")' \
  || { echo "build_base_image: $prefix has Python $pyver; need 3.11.x >= 3.11.4" >&2; exit 2; }
rm -rf "$rootfs"
mkdir -p "$rootfs"
# minbase: dpkg/apt and essentials. The libraries are what CPython's extension modules link to; git and
# tini are what the worker images run; no compiler, no Debian python3.
nice -n 10 debootstrap --variant=minbase \
  --include=ca-certificates,git,tini,procps,libssl3,libffi8,libsqlite3-0,libuuid1,liblzma5,libbz2-1.0,zlib1g,libreadline8,libncursesw6,libexpat1 \
  "$suite" "$rootfs" "$mirror" > "$workdir/debootstrap.log" 2>&1 || { tail -20 "$workdir/debootstrap.log" >&2; exit 1; }
# CPython into /usr/local (the public python image's layout): interpreter, shared library, standard
# library without its tests, GUI modules, headers or installed packages.
mkdir -p "$rootfs/usr/local/bin" "$rootfs/usr/local/lib"
cp -a "$prefix/bin/python3.11" "$rootfs/usr/local/bin/"
cp -a "$prefix"/lib/libpython3.11.so* "$prefix/lib/libpython3.so" "$rootfs/usr/local/lib/"
tar -C "$prefix/lib" --exclude='python3.11/test' --exclude='python3.11/idlelib' --exclude='python3.11/tkinter' \
  --exclude='python3.11/turtledemo' --exclude='python3.11/site-packages/*' --exclude='__pycache__' \
  --exclude='python3.11/config-3.11-*' -c python3.11 | tar -C "$rootfs/usr/local/lib" -x
ln -sf python3.11 "$rootfs/usr/local/bin/python3"
ln -sf python3.11 "$rootfs/usr/local/bin/python"
chroot "$rootfs" ldconfig
chroot "$rootfs" /usr/local/bin/python3 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, venv, ensurepip, tarfile; tarfile.data_filter' \
  || { echo "build_base_image: the copied Python does not work in the Debian root" >&2; exit 1; }
# Keep the image small: no apt lists, caches or docs.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
  "$rootfs"/var/log/*.log "$rootfs"/tmp/*
debian=$(cat "$rootfs/etc/debian_version")
image="transfer-pipeline/base:bookworm-${debian}-py${pyver}"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $suite minbase ($mirror) + CPython $pyver in /usr/local" - "$image" >/dev/null
rm -rf "$rootfs"
echo "$image"

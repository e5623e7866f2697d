#!/usr/bin/env bash
# Build (once) an arm64 Debian rootfs with Python, numpy, scipy, numba, pytest and hypothesis, run
# under qemu-user-static through binfmt (recipe: shared/research/aarch64.md). Needs root, Debian's
# packages and PyPI. Usage: tests/aarch64/build_rootfs.sh ROOTFS_DIR
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"  # chroot, update-binfmts live in sbin
R="${1:?usage: build_rootfs.sh ROOTFS_DIR}"
if [ -x "$R/opt/venv/bin/python" ] && [ -f "$R/.edgeformer-ready" ]; then
  echo "rootfs ready at $R"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v mmdebstrap >/dev/null || ! command -v arch-test >/dev/null || ! [ -e /usr/bin/qemu-aarch64-static ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends qemu-user-static binfmt-support mmdebstrap arch-test >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
rm -rf "$R"
mmdebstrap --quiet --architectures=arm64 --variant=minbase \
  --include=python3,python3-venv,ca-certificates,libgomp1 bookworm "$R" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main"
cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/host-ca.crt"
cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
A=(env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1)
chroot "$R" "${A[@]}" /usr/bin/python3 -m venv /opt/venv
# The runtime only: numpy, numba, scipy (no torch, no onnx: conversion happens on the workstation).
chroot "$R" "${A[@]}" pip install -q --only-binary=:all: "numpy<2.6" numba scipy pytest hypothesis
touch "$R/.edgeformer-ready"
echo "rootfs ready at $R"

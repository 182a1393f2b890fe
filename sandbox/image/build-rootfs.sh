#!/bin/sh
# Build the offline base of the critloop sandbox image: a minimal Debian bookworm rootfs with
# python3, sympy and numpy, packed as a tarball for `docker import`. Needs root and debootstrap.
# Usage: build-rootfs.sh OUT.tar [MIRROR]
set -eu
out=$1
mirror=${2:-http://deb.debian.org/debian}
root=$(mktemp -d /tmp/critloop-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3-minimal,python3-sympy,python3-numpy \
    bookworm "$root" "$mirror"
# What a sandbox never needs: package caches, docs, manuals, locales.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
tar -C "$root" -cf "$out" .

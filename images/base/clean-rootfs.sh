#!/bin/sh
# Run inside a fresh debootstrap root (by scripts/build_images.py, through `buildah run`): turn it
# into the runtime base every shopfleet image starts from. Keeps Python, libc, libstdc++ (the
# manylinux wheels need it), dpkg's database (so scanners see what is installed) and apt (the
# builder base installs python3-venv and binutils on top of this one); drops what no container reads.
set -eu
# debootstrap ran with python3-venv (ensurepip's bundled pip): the runtime has no pip at all.
dpkg --purge python3-venv python3.11-venv python3-pip-whl python3-setuptools-whl >/dev/null 2>&1 || true
# Future dpkg installs (the builder's) skip docs, man pages and translations too.
mkdir -p /etc/dpkg/dpkg.cfg.d
cat >/etc/dpkg/dpkg.cfg.d/01-shopfleet-slim <<'CFG'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
CFG
apt-get clean
# Licences stay (/usr/share/doc/*/copyright); everything else under doc goes.
find /usr/share/doc -type f ! -name copyright -delete
find /usr/share/doc -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian \
       /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
       /var/log/* /tmp/* /var/tmp/*
# /etc/hostname and /etc/resolv.conf are bind-mounted here by buildah run: build_images.py
# empties them (and drops /etc/machine-id) in the root before it is imported.

# Second phase (`clean-rootfs.sh slim`), after the builder base was committed from the first:
# what only installing packages needs goes too - apt, Perl (dpkg's maintainer scripts), glibc's
# iconv modules (Python has its own codecs). The dpkg database stays and says what remains.
if [ "${1:-}" = slim ]; then
  dpkg --purge --force-remove-essential --force-depends apt libapt-pkg6.0 debconf perl-base >/dev/null 2>&1 || true
  # python3-venv's dependencies (lib2to3, distutils) and pydoc's topic data: no runtime imports them.
  dpkg --purge --force-depends python3-lib2to3 python3-distutils >/dev/null 2>&1 || true
  rm -rf /usr/lib/*-linux-gnu/gconv /usr/lib/*-linux-gnu/perl-base /usr/share/perl5 /var/cache/debconf \
         /etc/apt /var/lib/apt /usr/share/zoneinfo/right /usr/share/zoneinfo/posix \
         /usr/lib/python3.11/pydoc_data /usr/lib/python3.11/lib2to3 /usr/lib/python3.11/distutils
fi

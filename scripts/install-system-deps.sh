#!/usr/bin/env bash
# Install the Debian packages the test suite and the demo use, if they are missing.
# Runs as root (CI, containers) or through sudo when available; otherwise prints what to install.
set -euo pipefail
PKGS=(
  mosquitto                      # MQTT broker the tests start on free ports
  chromium chromium-driver       # dashboard tests in headless Chromium (never a browser download)
  gcc-avr avr-libc arduino-core-avr arduino-mk   # build the sensor-board firmware
  simavr libsimavr-dev libsimavrparts1 libelf-dev pkg-config  # run it under emulation
  opencv-doc                     # vtest.avi, a real video of walking people
  socat                          # serial plumbing for manual experiments
  prometheus                     # promtool: checks the alerting rules in manifests/monitoring
  buildah podman skopeo runc     # make images and tests/containers: build, run and inspect OCI images (runc: crun refuses some cgroup layouts)
  debootstrap                    # the images' base root, from Debian packages (no base image is pulled)
  qemu-user-static binfmt-support  # arm64 images built and run on amd64
  docker-registry                # the local OCI registry images are pushed to and releases resolve from
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo; else
    echo "system-deps: not root; tests needing these packages will be skipped: ${missing[*]}" >&2
    echo "system-deps: install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 0
  fi
fi
echo "system-deps: installing ${missing[*]}" >&2
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null

# The builder base: the runtime base (before its slim phase: apt and Perl still there) plus what building a venv needs (ensurepip's pip via
# python3-venv, binutils' strip for the wheels' shared libraries). Only build stages use it, so
# none of this reaches a runtime image. ARCH is passed by scripts/build_images.py.
ARG ARCH=amd64
FROM localhost/shopfleet/base-debian:bookworm-${ARCH}
RUN apt-get update -q >/dev/null \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv binutils >/dev/null \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*

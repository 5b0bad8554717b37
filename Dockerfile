# syntax=docker/dockerfile:1
# GreyArray BIDS-App image: Debian's Python 3.11 in a venv, GreyArray installed from this repository.
#   docker build -t greyarray .
#   docker run --rm -u "$(id -u):$(id -g)" -v /data:/data:ro -v /out:/out greyarray /data /out group
FROM debian:bookworm-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="GreyArray" \
      org.opencontainers.image.description="BIDS-App: CIFTI-2 greyordinate maps to and from ModelArray's HDF5 layout" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/greyarray/greyarray" \
      org.opencontainers.image.licenses="MIT"

# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/greyarray

COPY pyproject.toml README.md /tmp/greyarray/
COPY boilerplate /tmp/greyarray/boilerplate
COPY src /tmp/greyarray/src
# The build secret "hostca" is only needed where pip must trust a local CA; elsewhere it is absent.
RUN --mount=type=secret,id=hostca \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi; \
    /opt/greyarray/bin/pip install --no-cache-dir /tmp/greyarray \
 && /opt/greyarray/bin/pip uninstall -y -q pip setuptools \
 && find /opt/greyarray/lib -depth -type d -name tests -exec rm -rf {} + \
 && rm -rf /tmp/greyarray \
 && useradd --uid 1000 --create-home --home-dir /home/greyarray greyarray \
 && chmod 1777 /home/greyarray

# Bytecode is compiled at build (a second per run saved); test suites of the libraries and pip are
# removed. HOME is writable for any uid given with `docker run -u`; GREYARRAY_CONTAINER_* fill
# GeneratedBy.Container in dataset_description.json.
ENV PATH=/opt/greyarray/bin:$PATH \
    HOME=/home/greyarray \
    PYTHONDONTWRITEBYTECODE=1 \
    GREYARRAY_CONTAINER_TYPE=docker \
    GREYARRAY_CONTAINER_TAG=greyarray:${VERSION}
USER 1000
WORKDIR /home/greyarray
ENTRYPOINT ["greyarray"]
CMD ["--help"]

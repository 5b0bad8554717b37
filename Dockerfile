# GreyArray BIDS-App image: Debian's Python 3.11 in a venv, GreyArray installed from this repository.
#   docker build -t greyarray .
#   docker run --rm -u "$(id -u):$(id -g)" -v /data:/data:ro -v /out:/out greyarray /data /out group
# The version is pyproject.toml's: CI passes it as VERSION for the label; the program reports it.
FROM debian:bookworm-slim

ARG VERSION=unknown
LABEL org.opencontainers.image.title="GreyArray" \
      org.opencontainers.image.description="BIDS-App: CIFTI-2 greyordinate maps to and from ModelArray's HDF5 layout" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/greyarray/greyarray" \
      org.opencontainers.image.licenses="MIT"

# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && python3 -m venv /opt/greyarray

# Dependencies in a layer of their own, at the versions of constraints.txt (shared with CI and the
# README's install): a change to GreyArray's code does not reinstall them. The build secret
# "hostca" is only needed where pip must trust a local CA; elsewhere it is absent.
COPY pyproject.toml constraints.txt /tmp/greyarray/
RUN --mount=type=secret,id=hostca \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi; \
    /opt/greyarray/bin/python -c "import tomllib; \
print('\n'.join(tomllib.load(open('/tmp/greyarray/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/greyarray/requirements.txt \
 && /opt/greyarray/bin/pip install --no-cache-dir -r /tmp/greyarray/requirements.txt \
      -c /tmp/greyarray/constraints.txt \
 && find /opt/greyarray/lib -depth -type d -name tests -exec rm -rf {} +

COPY README.md /tmp/greyarray/
COPY boilerplate /tmp/greyarray/boilerplate
COPY src /tmp/greyarray/src
RUN --mount=type=secret,id=hostca \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi; \
    /opt/greyarray/bin/pip install --no-cache-dir --no-deps /tmp/greyarray \
 && /opt/greyarray/bin/pip uninstall -y -q pip setuptools \
 && /opt/greyarray/bin/python -m compileall -q /opt/greyarray/lib \
 && rm -rf /tmp/greyarray \
 && useradd --uid 1000 --create-home --home-dir /home/greyarray greyarray \
 && chmod 1777 /home/greyarray

# Bytecode is compiled at build (a second per run saved). HOME is writable for any uid given with
# `docker run -u`; GREYARRAY_CONTAINER_TYPE fills GeneratedBy.Container in dataset_description.json.
# GreyArray handles SIGTERM itself (also as PID 1): `docker stop` ends a run cleanly in seconds.
ENV PATH=/opt/greyarray/bin:$PATH \
    HOME=/home/greyarray \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    GREYARRAY_CONTAINER_TYPE=docker
USER 1000
WORKDIR /home/greyarray
ENTRYPOINT ["greyarray"]
CMD ["--help"]

# icpgate in a container: built apart (the project and its dependencies from PyPI into a virtual
# environment), run non-root, example config, health check. docs/deployment.md, "The image".
#   make image                                   # podman (or buildah) build --format docker
#   make image BASE=$(bash tests/debian-base.sh)   # no registry of images: a base from Debian's packages
# Build with --format docker: the OCI format has no HEALTHCHECK and drops it.
# The user icpgate has no capabilities: listeners use ports >= 1024 on 0.0.0.0, published on the low ones:
#   podman run -d -p 80:8080 -p 443:8443 -v icpgate-state:/var/lib/icpgate -v ./config.toml:/etc/icpgate/config.toml:ro icpgate
# The config holds the state's paths: registry.path = "/var/lib/icpgate/registry.db", in the volume.
# Run operator commands with the daemon's own config: podman exec icpgate icpgate violations
# Transparent (inline) mode needs the host's network and CAP_NET_ADMIN in the process: start as root
# with only NET_ADMIN, SETUID and SETGID, and let setpriv (util-linux, in every Debian base) switch to
# icpgate keeping CAP_NET_ADMIN as an ambient capability (the command is in docs/deployment.md).

# Any Debian bookworm with python3 (>= 3.11) and its venv module: the official Python image, or the
# base tests/debian-base.sh makes. Neither is written to outside /opt/icpgate (PEP 668).
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler and Python's headers, to compile the HTTP engine; this stage only, not in the image.
RUN command -v cc >/dev/null \
    && [ -e "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         gcc libc6-dev $([ -x /usr/local/bin/python3 ] || echo python3-dev) >/dev/null; }
# The dependencies first, in a layer of their own: a change to the code alone rebuilds from here on.
# Behind a TLS-inspecting proxy, give pip the machine's CA bundle: --secret id=ca-bundle,src=FILE
# (make image CA_BUNDLE=FILE); it is mounted for this step only and is not in the image.
COPY pyproject.toml README.md /src/
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && python3 -m venv /opt/icpgate \
    && /opt/icpgate/bin/pip install --upgrade pip "setuptools>=77" "Cython>=3.0" \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > /src/requirements.txt \
    && /opt/icpgate/bin/pip install -r /src/requirements.txt
COPY daemon /src/daemon
# Then the project alone (the engine must build: the image runs the compiled engine), and out with
# what only building needed.
RUN /opt/icpgate/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/icpgate/bin/python -c 'import icpgate.gate.http._engine' \
    && /opt/icpgate/bin/pip uninstall --yes --quiet setuptools cython pip

FROM ${BASE}
RUN groupadd --gid 10001 icpgate \
    && useradd --uid 10001 --gid icpgate --no-create-home --home-dir /var/lib/icpgate --shell /usr/sbin/nologin icpgate \
    && install -d -o icpgate -g icpgate -m 0750 /var/lib/icpgate
COPY --from=build /opt/icpgate /opt/icpgate
RUN ln -s /opt/icpgate/bin/icpgate /usr/local/bin/icpgate
COPY policies /etc/icpgate/policies
COPY config.example.toml /etc/icpgate/config.example.toml
# The installed config keeps its state in the volume (the same command as docs/deployment.md's install).
RUN sed 's|^path = "var/registry.db"$|path = "/var/lib/icpgate/registry.db"|' /etc/icpgate/config.example.toml \
    > /etc/icpgate/config.toml && grep -q '^path = "/var/lib/icpgate/registry.db"$' /etc/icpgate/config.toml
USER icpgate
WORKDIR /var/lib/icpgate
VOLUME ["/var/lib/icpgate"]
# The listener ports: 1024 and up, since the user cannot bind lower ones (publish with -p 80:8080).
EXPOSE 8080 8443
ENV PYTHONUNBUFFERED=1
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 3).close()"]
ENTRYPOINT ["icpgate"]
CMD ["run", "-c", "/etc/icpgate/config.toml"]

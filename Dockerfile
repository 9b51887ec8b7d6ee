# syntax=docker/dockerfile:1
# icpgate in a container: multi-stage (wheels built apart), non-root, example config, health check.
# docs/deployment.md, "Docker". The user icpgate has no capabilities: listeners use ports >= 1024 on
# 0.0.0.0, and Docker publishes them on the low ones:
#   docker build -t icpgate .
#   docker run -d -p 80:8080 -p 443:8443 -v icpgate-state:/var/lib/icpgate -v ./config.toml:/etc/icpgate/config.toml:ro icpgate
# The config holds the state's paths: registry.path = "/var/lib/icpgate/registry.db", in the volume.
# Run operator commands with the daemon's own config: docker exec icpgate icpgate violations
# (docs/deployment.md, "Docker", also imports filings into the volume).
# Transparent (inline) mode needs --network host and CAP_NET_ADMIN in the process: start as root with
# only NET_ADMIN, SETUID and SETGID, and let setpriv (util-linux, in the base image) switch to
# icpgate keeping CAP_NET_ADMIN as an ambient capability (the command is in docs/deployment.md).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/icpgate --shell /usr/sbin/nologin icpgate \
    && install -d -o icpgate -g icpgate -m 0750 /var/lib/icpgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
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
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 3).close()"]
ENTRYPOINT ["icpgate"]
CMD ["run", "-c", "/etc/icpgate/config.toml"]

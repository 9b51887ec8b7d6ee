# syntax=docker/dockerfile:1
# icpgate in a container: multi-stage (wheels built apart), non-root, example config, health check.
#   docker build -t icpgate .
#   docker run --network host -v icpgate-state:/var/lib/icpgate -v ./my-config.toml:/etc/icpgate/config.toml icpgate
# Import filings into the volume with: docker run ... icpgate import /data/filings.ndjson -c /etc/icpgate/config.toml

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
COPY config.example.toml /etc/icpgate/config.toml
USER icpgate
WORKDIR /var/lib/icpgate
VOLUME ["/var/lib/icpgate"]
# The example config's listeners; a config of your own may use others.
EXPOSE 8080 8443
ENV PYTHONUNBUFFERED=1
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 3).close()"]
ENTRYPOINT ["icpgate"]
CMD ["run", "-c", "/etc/icpgate/config.toml", "--set", "registry.path=\"/var/lib/icpgate/registry.db\""]

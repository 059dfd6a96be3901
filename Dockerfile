# syntax=docker/dockerfile:1
# The saga-streams binary in a small Debian image (docker-compose.yml builds it as saga-streams:local).
#
#   docker build -t saga-streams:local .
#   docker run --rm saga-streams:local describe topologies/order_saga.yaml
#
# The first build compiles librdkafka and RocksDB from source (several minutes); the cache mounts
# keep the cargo registry and target directory between builds.

FROM rust:1.88-bookworm AS builder
# clang/libclang for the RocksDB bindings (bindgen), cmake and a C/C++ toolchain for librdkafka
# and RocksDB, OpenSSL headers for rdkafka's `ssl` and the registry client's native TLS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        clang libclang-dev cmake libssl-dev pkg-config build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo discovers the examples when it reads the manifest.
COPY examples ./examples
COPY topologies ./topologies
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin saga-streams \
    && cp target/release/saga-streams /usr/local/bin/saga-streams

FROM debian:bookworm-slim
# libssl3: OpenSSL is linked dynamically. libstdc++6 (RocksDB) and zlib1g (librdkafka) are in the
# base image already; they are listed so that stays true.
# curl: the HEALTHCHECK.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 libstdc++6 zlib1g curl \
    && rm -rf /var/lib/apt/lists/*
# A non-root user. /data is where docker-compose.yml mounts the state volumes (a new named volume
# takes this directory's owner); /app/state is the default --state-dir.
RUN useradd --system --user-group --uid 10001 --home-dir /app --shell /usr/sbin/nologin saga \
    && mkdir -p /app/state /data \
    && chown saga:saga /app/state /data
COPY --from=builder /usr/local/bin/saga-streams /usr/local/bin/saga-streams
COPY topologies /app/topologies
# The Avro schemas a topology's `schemas: ../schemas` names (relative to topologies/).
COPY schemas /app/schemas
WORKDIR /app
USER saga
# --metrics-addr (pass 0.0.0.0:9464 in a container): /metrics, /health, /ready, /sagas/{order_id}.
EXPOSE 9464
# Alive: /health on the default port, over HTTP or (with --http-tls-cert) HTTPS. Readiness is for
# the orchestrator to decide (Kubernetes: the chart's readinessProbe on /ready).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9464/health >/dev/null || curl -fsSk https://127.0.0.1:9464/health >/dev/null || exit 1
ENTRYPOINT ["saga-streams"]
CMD ["--help"]

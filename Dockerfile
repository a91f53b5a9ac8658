# syntax=docker/dockerfile:1
#
# Custodian container image.
#
#   docker build -t custodian .
#   docker run --read-only --tmpfs /tmp -v custodian-data:/data -p 127.0.0.1:5005:5005 \
#       -e CUSTODIAN_ENV=dev custodian
#
# The image defaults to CUSTODIAN_ENV=prod, which refuses to start (exit 78) until TLS
# (or server.behind_tls_proxy), a keyring file (mode 0600) and the other prod rules are
# satisfied: see docker-compose.yml for a complete deployment.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder

# The slim Rust image already has gcc and libc6-dev, which is all the build needs
# (SQLite is bundled, TLS is rustls with ring: no OpenSSL, no pkg-config).
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

WORKDIR /build

# 1. Dependencies only. The manifests plus a stub crate build every dependency in a
#    layer that is reused until Cargo.toml or Cargo.lock change. The stub's own
#    artifacts are deleted afterwards so that step 2 always rebuilds the real crate
#    (COPY keeps old mtimes, which could otherwise fool cargo's freshness check).
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    mkdir -p src \
    && printf 'fn main() {}\n' > src/main.rs \
    && : > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src \
        target/release/custodian* \
        target/release/libcustodian* \
        target/release/deps/custodian-* \
        target/release/deps/libcustodian-* \
        target/release/.fingerprint/custodian-*

# 2. The crate itself. Migrations, templates, assets and the compliance map are
#    embedded in the binary (include_str!, askama), so they are needed at build time only.
COPY src ./src
COPY migrations ./migrations
COPY templates ./templates
COPY assets ./assets
COPY compliance ./compliance
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo build --release --locked \
    && install -D -m 0755 target/release/custodian /out/custodian

# ---------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# No packages are installed: the binary needs only glibc and libgcc_s, and carries its
# own TLS roots (webpki-roots). bash (already in the base image) runs the health check.
# /data is the only writable place besides /tmp; it is private to the service user.
RUN groupadd --system --gid 10001 custodian \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin custodian \
    && install -d -o 10001 -g 10001 -m 0700 /data \
    && install -d -o root -g root -m 0755 /app

COPY --from=builder /out/custodian /usr/local/bin/custodian

# Defaults; every key can be overridden with CUSTODIAN_* variables, --set, or a config
# file. The working directory /app is read-only and root-owned, so the default config
# file (./config/<env>.yaml) can only come from a read-only mount such as
# /app/config/prod.yaml, never from the writable data volume.
ENV CUSTODIAN_ENV=prod \
    CUSTODIAN_DATA_DIR=/data \
    CUSTODIAN_SERVER__LISTEN=0.0.0.0:5005 \
    TMPDIR=/tmp

WORKDIR /app
VOLUME ["/data"]
EXPOSE 5005
USER 10001:10001

# Liveness via GET /health over plain HTTP using only bash built-ins (no curl in the
# image). The port follows CUSTODIAN_SERVER__LISTEN. If the container itself serves TLS
# (server.tls.cert/key), replace this check in the orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "listen=${CUSTODIAN_SERVER__LISTEN:-0.0.0.0:5005}; exec 3<>\"/dev/tcp/127.0.0.1/${listen##*:}\" && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && IFS= read -r -t 4 status <&3 && [[ $status == 'HTTP/1.1 200 '* ]]"]

ENTRYPOINT ["/usr/local/bin/custodian"]
CMD ["serve"]

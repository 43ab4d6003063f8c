# ds-server and ds-sync in one small runtime image (compose.yaml runs both from it).
#
#   docker build -t durable-streams:local .
#
# Stage 1 builds release binaries; stage 2 is Debian slim with the two binaries, CA roots and curl
# (for the healthchecks), running as an unprivileged user.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binaries are copied out of
# the cached target dir because it is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ds-server -p ds-sync \
 && mkdir -p /out \
 && cp target/release/ds-server target/release/ds-sync /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# /var/lib/ds/data exists and is owned by `ds` in the image, so a fresh named volume mounted there
# inherits that ownership and the server can write to it.
RUN useradd --system --uid 10001 --home-dir /var/lib/ds --shell /usr/sbin/nologin ds \
 && mkdir -p /var/lib/ds/data \
 && chown -R ds:ds /var/lib/ds
COPY --from=builder /out/ds-server /out/ds-sync /usr/local/bin/
USER ds
WORKDIR /var/lib/ds
# 4437: the protocol's default port (PROTOCOL.md 13.1).
EXPOSE 4437
CMD ["ds-server"]

# syntax=docker/dockerfile:1
# One image for every subcommand (controller, extender, agent, crd, digest, simulate, estimate):
#   docker build -t registry.example.com/commonground:0.1.0 .
# The chart picks the subcommand with `args:`.

# --- build: a static musl binary ---------------------------------------------------------
# The toolchain the lockfile is tested with (the crate's floor, rust-version, is 1.89). The TLS
# stack is rustls + ring (no OpenSSL), so the musl target links statically with no system
# libraries; ring's C/assembly parts need only musl-gcc.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin commonground --target x86_64-unknown-linux-musl \
 && install -D -m 0755 target/x86_64-unknown-linux-musl/release/commonground /out/commonground \
 && /out/commonground --version

# --- run: the binary and nft -------------------------------------------------------------
# Debian slim with nftables: the agent's relay in KubeVirt's path holds its interception rules
# through an `nft -i` process (the rules are owned by it and vanish with it). Nothing else is
# added; every component runs the one static binary.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/commonground /usr/local/bin/commonground
# The agent overrides this with runAsUser: 0 (it needs CAP_SYS_PTRACE over QEMU processes, and
# NET_ADMIN and SYS_ADMIN for the relay in KubeVirt's path);
# controller and extender run as 65532.
USER 65532:65532
EXPOSE 8080 8081 8888
ENTRYPOINT ["/usr/local/bin/commonground"]
CMD ["--help"]

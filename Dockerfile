# `mtl serve` in a container: a build stage compiles the release binary; the final stage holds only that binary
# and runs it as a non-root user. Models are mounted, not baked in:
#   docker build -t mtl .
#   docker run --rm -p 127.0.0.1:8080:8080 -v "$PWD/runs/atis:/models/run:ro" mtl
#   docker run --rm -p 127.0.0.1:8080:8080 -v "$PWD/assets/models/SmolLM2-135M-Instruct:/models/run:ro" mtl
# Inside the container the server binds 0.0.0.0 (so the published port reaches it); publish it on loopback or
# behind a reverse proxy, and give it --api-keys for anything wider (README, "Running in production").
# Not built by scripts/test.sh: its machines have no Docker daemon and no image registry.
FROM rust:1.94-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mtl-cli

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin mtl
COPY --from=build /src/target/release/mtl /usr/local/bin/mtl
USER 10001
EXPOSE 8080
ENTRYPOINT ["mtl"]
CMD ["serve", "/models/run", "--addr", "0.0.0.0:8080"]

# Redis 7 from Debian's package, for hosts that cannot pull Docker Hub's redis:7 (CI here):
#   docker build --build-arg BASE_IMAGE=local/debian:bookworm -t local/redis:7 \
#     -f deploy/docker/redis.Dockerfile deploy/docker
# Like the official image it runs as the user "redis" in /data; docker-compose.yml passes
# --protected-mode no (the official image compiles that default in; Debian's does not).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]

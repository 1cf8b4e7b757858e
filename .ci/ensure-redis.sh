#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:6379, for the Redis tests (in CI they must run,
# never skip). Idempotent: when one answers already, nothing is done. Otherwise it starts the
# installed redis-server, installing it with apt-get first if it is missing, without
# persistence (a throwaway server for tests). Exits non-zero, saying why, when it cannot.
#
# REDIS_PORT overrides the port (to try this script without touching a running server).
set -euo pipefail

HOST=127.0.0.1
PORT=${REDIS_PORT:-6379}
LOG=/tmp/redis-ci.log

die() {
    echo "ensure-redis: $*" >&2
    exit 1
}

ping_redis() {
    # Plain bash, so that no redis-cli is needed: send PING, expect +PONG.
    timeout 1 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r reply <&3
        [[ $reply == +PONG* ]]
    ' "$HOST" "$PORT" 2>/dev/null
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo -n "$@"
    else
        die "installing redis-server needs root (or sudo): $*"
    fi
}

if ping_redis; then
    echo "ensure-redis: Redis answers on $HOST:$PORT"
    exit 0
fi

server=$(command -v redis-server || true)
if [[ -z $server && -x /usr/bin/redis-server ]]; then
    server=/usr/bin/redis-server
fi
if [[ -z $server ]]; then
    command -v apt-get >/dev/null || die "redis-server is not installed and there is no apt-get to install it"
    echo "ensure-redis: installing redis-server with apt-get"
    as_root apt-get update -qq || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server \
        || die "apt-get install redis-server failed"
    server=$(command -v redis-server || echo /usr/bin/redis-server)
    [[ -x $server ]] || die "redis-server is still missing after apt-get install"
fi

# The package may have started a server of its own; otherwise start one.
if ! ping_redis; then
    echo "ensure-redis: starting $server on $HOST:$PORT (log: $LOG)"
    "$server" --daemonize yes --bind 127.0.0.1 -::1 --port "$PORT" --save "" \
        --appendonly no --dir /tmp --logfile "$LOG" \
        || die "redis-server did not start; see $LOG"
fi

deadline=$((SECONDS + 15))
while ((SECONDS < deadline)); do
    if ping_redis; then
        echo "ensure-redis: Redis answers on $HOST:$PORT"
        exit 0
    fi
    sleep 0.2
done
die "nothing answers on $HOST:$PORT after starting redis-server (is the port taken?); see $LOG"

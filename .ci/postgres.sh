# Sourced by .ci/run: a throwaway PostgreSQL server for the multi-worker sweep tests.
#   pg_install: install the Debian packages if missing, PostgreSQL and tcmalloc (.ci/run starts
#             it in the background, beside the Python installs)
#   pg_start: install the Debian package if needed, start a server in a temp folder, create a
#             database, export LORALAB_TEST_PG_URL
#   pg_stop:  stop the server and remove its folder
# Also usable by hand: `. .ci/postgres.sh && pg_start && python -m pytest tests/test_sweep.py`.

pg_install() {
    local sudo="" packages=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages="postgresql"
    # tcmalloc too, so that the tests also run the heap allocator loralab picks where it can
    # (loralab/allocator.py); without it they run under glibc's malloc.
    ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || packages="$packages libtcmalloc-minimal4"
    if [ -n "$packages" ]; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $packages >/dev/null
    fi
}

pg_start() {
    pg_install
    PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
    PG_DIR=$(mktemp -d /tmp/loralab-pg.XXXXXX)
    PG_AS=""
    if [ "$(id -u)" -eq 0 ]; then
        # The server refuses to run as root: run it as the package's postgres user.
        PG_AS="runuser -u postgres --"
        chown postgres "$PG_DIR"
    fi
    PG_PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    $PG_AS "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U loralab >/dev/null
    $PG_AS "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
        -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U loralab loralab_test
    export LORALAB_TEST_PG_URL="postgresql://loralab@127.0.0.1:$PG_PORT/loralab_test"
    echo "PostgreSQL for the tests: $LORALAB_TEST_PG_URL"
}

pg_stop() {
    if [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR/data" ]; then
        $PG_AS "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true
        rm -rf "$PG_DIR"
    fi
}

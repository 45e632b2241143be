#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu checkout: a virtualenv in .venv with the
# project and its test tools, and the Mosquitto broker binary the tests and
# the simulator start privately (they never use a system broker on 1883).
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { [ "$(id -u)" -eq 0 ]; }

apt_install() {
    if as_root && command -v apt-get >/dev/null 2>&1; then
        echo "==> apt-get install $*"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "error: '$*' is missing and this script can only install it as root on Debian/Ubuntu." >&2
        echo "       Run: sudo apt-get install -y $*   (then run this command again)" >&2
        exit 1
    fi
}

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is required (found: $("$PY" --version 2>&1 || echo none))." >&2
    exit 1
fi

if ! find_mosquitto=$(command -v mosquitto || ls /usr/sbin/mosquitto 2>/dev/null); then
    apt_install mosquitto
    # Debian starts a system broker on 1883; the project never uses it.
fi

# nats-server: the NATS cluster tests (tests/test_nats_cluster.py, skipped without it) and
# bench/bench_brokers.py. Optional: installed only when this script can (root, apt).
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ] \
        && as_root && command -v apt-get >/dev/null 2>&1; then
    apt_install nats-server
fi

# systemd-analyze checks the units `addin-agent service install` writes (tests/test_service.py;
# skipped without it). Optional: installed only when this script can (root, apt).
if ! command -v systemd-analyze >/dev/null 2>&1 && as_root && command -v apt-get >/dev/null 2>&1; then
    apt_install systemd
fi

# slapd and ldap-utils: tests/test_directory_sync.py starts a private OpenLDAP on a free
# loopback port with its own config and data (never the system instance Debian's package may
# configure). Optional: installed only when this script can (root, apt); the tests skip
# otherwise, saying how to install them.
if ! { command -v slapd || ls /usr/sbin/slapd; } >/dev/null 2>&1 && as_root && command -v apt-get >/dev/null 2>&1; then
    apt_install slapd ldap-utils
fi

# Debian's Chromium drives the console's browser tests (tests/test_console_browser.py, through
# Playwright with executable_path=/usr/bin/chromium: never a browser Playwright downloads).
# Optional: installed only when this script can (root, apt); the tests skip and say so otherwise.
if [ ! -x /usr/bin/chromium ] && as_root && command -v apt-get >/dev/null 2>&1; then
    apt_install chromium chromium-driver || echo "warning: chromium could not be installed: the console browser tests will skip" >&2
fi

# PostgreSQL: the server's second backend. The backend tests (tests/conftest.py `db_target`,
# tests/test_replicas.py) make and drop a database of their own on 127.0.0.1:5432 as user
# postgres with trust auth (ADDIN_TEST_POSTGRES names another server); they skip, saying why,
# when none answers. Optional: installed and started only when this script can (root, apt).
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && as_root && command -v apt-get >/dev/null 2>&1; then
    apt_install postgresql || echo "warning: postgresql could not be installed: the PostgreSQL tests will skip" >&2
fi
if [ -z "${ADDIN_TEST_POSTGRES:-}" ] && command -v pg_ctlcluster >/dev/null 2>&1 && as_root \
    && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
        conf=/etc/postgresql/$version/main/pg_hba.conf
        # Loopback trust for the tests' throwaway databases, as on the project's machines.
        if [ -f "$conf" ] && ! grep -q "addin-deploy tests" "$conf"; then
            sed -i '1i host all postgres 127.0.0.1/32 trust  # addin-deploy tests' "$conf"
        fi
        pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
    done
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        apt_install python3-venv
        "$PY" -m venv .venv
    fi
fi

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "==> installing the project and its test tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[server,sim,test,fast]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

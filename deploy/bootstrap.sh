#!/bin/sh
# Set up relay on a fresh machine and run it, or run its whole test suite.
#
#   sh deploy/bootstrap.sh run [relay options]   install, build, start relay
#   sh deploy/bootstrap.sh test [pytest options] install, build, run every test
#
# Needs only Python 3.11+, a C compiler and apt-get (for redis-server and
# prometheus, which the tests start on free ports of their own, and chromium,
# which the status page tests drive headless). Everything else goes into
# .venv beside this checkout. Safe to run again: finished steps are skipped.
set -eu

cd "$(dirname "$0")/.."
mode="${1:-run}"
[ $# -gt 0 ] && shift

say() { printf 'bootstrap: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else say "need root for: $*"; return 1
    fi
}

apt_updated=""
apt_install() {
    command -v apt-get >/dev/null 2>&1 || { say "apt-get not found; install $* by hand"; return 1; }
    if [ -z "$apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

find_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    say "Python 3.11 or newer is required"; return 1
}

setup_venv() {
    extras="$1"
    spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    py="$(find_python)"
    if [ ! -x .venv/bin/python ]; then
        say "creating .venv with $py"
        "$py" -m venv .venv 2>/dev/null || { apt_install python3-venv && "$py" -m venv .venv; }
    fi
    stamp=".venv/.relay-installed${extras:+-$extras}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
        say "installing relay and its dependencies ($spec)"
        .venv/bin/python -m pip install -q --upgrade pip >&2
        .venv/bin/python -m pip install -q "cython>=3.0" "setuptools>=77" wheel >&2
        .venv/bin/python -m pip install -q -e "$spec" >&2
        touch "$stamp"
    fi
    # Compiled twins of relay/_fast next to their sources; falls back to pure
    # Python with a banner when no compiler is available.
    .venv/bin/python setup.py -q build_ext --inplace >&2
}

case "$mode" in
    run)
        setup_venv ""
        exec .venv/bin/python -m relay "$@"
        ;;
    test)
        setup_venv test
        command -v redis-server >/dev/null 2>&1 || apt_install redis-server
        command -v promtool >/dev/null 2>&1 || apt_install prometheus
        # The status page tests drive Debian's chromium headless (never a
        # browser download).
        command -v chromium >/dev/null 2>&1 || apt_install chromium
        # The suite must prove the compiled extensions loaded (their tests
        # fail otherwise); RELAY_NO_EXTENSIONS=1 in the environment tests the
        # pure twins alone instead.
        if [ -z "${RELAY_NO_EXTENSIONS:-}" ]; then
            export RELAY_EXPECT_EXTENSIONS=1
        fi
        exec .venv/bin/python -m pytest -q "$@"
        ;;
    *)
        say "usage: sh deploy/bootstrap.sh run|test [options]"
        exit 2
        ;;
esac

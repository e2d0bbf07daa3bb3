#!/usr/bin/env bash
# Create (once) the Python virtualenv for the E2B-SDK compatibility tests and
# install tests/python/requirements.txt into it (exact pins).
#
#   .ci/python-venv.sh            # prints the venv path on its last line
#   "$(.ci/python-venv.sh | tail -1)/bin/pytest" tests/python
#
# Where the venv goes:
#   $NANOCLAW_VENV                     if set
#   else $CARGO_TARGET_DIR/venv        if CARGO_TARGET_DIR is set
#   else <repo>/target/venv
#
# Which Python: $NANOCLAW_PYTHON if set, else /usr/bin/python3 (Debian's), else
# python3 from PATH. It must be >= 3.11 (the pinned e2b SDK needs typing.Self
# and typing.Unpack).
#
# On a fresh Debian 12 machine, Debian's python3 (3.11) cannot create venvs
# until the `python3-venv` package is installed (ensurepip is split out):
#     apt-get install -y python3-venv
# This script does not run apt itself; it fails with that hint instead.
#
# Idempotent: an existing venv whose recorded requirements hash matches is
# left alone (a few milliseconds); a venv that is broken or was built from
# other requirements is rebuilt. pip runs quietly with retries and a timeout;
# the whole install is tried up to 3 times (PyPI hiccups).
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
REQS="$REPO/tests/python/requirements.txt"
# The MCP SDK v2 is also the `mcp` package: it goes into VENV/mcp-v2
# (pip install --target), put on PYTHONPATH by the v2 suite's runner only.
REQS_V2="$REPO/tests/python/requirements-mcp-v2.txt"
VENV="${NANOCLAW_VENV:-${CARGO_TARGET_DIR:-$REPO/target}/venv}"

die() { echo "python-venv: $*" >&2; exit 1; }

[[ -f "$REQS" ]] || die "missing $REQS"

if [[ -n "${NANOCLAW_PYTHON:-}" ]]; then
    PY="$NANOCLAW_PYTHON"
elif [[ -x /usr/bin/python3 ]]; then
    PY=/usr/bin/python3
elif command -v python3 >/dev/null 2>&1; then
    PY="$(command -v python3)"
else
    die "no python3 found (on Debian 12: apt-get install -y python3 python3-venv)"
fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "$PY is $("$PY" -V 2>&1); the pinned e2b SDK needs Python >= 3.11"

# VENV/mcp-v2, installed (again) when its requirements changed.
mcp_v2() {
    local target="$VENV/mcp-v2" v2_hash
    v2_hash="$( (cat "$REQS_V2"; "$PY" -V 2>&1) | sha256sum | cut -d' ' -f1)"
    if [[ -f "$target/.nanoclaw-requirements.sha256" \
        && "$(cat "$target/.nanoclaw-requirements.sha256")" == "$v2_hash" ]]; then
        return 0
    fi
    rm -rf "$target"
    local attempt
    for attempt in 1 2 3; do
        if PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "$VENV/bin/pip" install --quiet \
            --retries 5 --timeout 60 --target "$target" -r "$REQS_V2"; then
            PYTHONPATH="$target" "$VENV/bin/python" -c 'from mcp import Client' \
                || die "VENV/mcp-v2 cannot import mcp.Client"
            echo "$v2_hash" >"$target/.nanoclaw-requirements.sha256"
            return 0
        fi
        rm -rf "$target"
        sleep $((attempt * 5))
    done
    die "pip install --target $target -r $REQS_V2 failed 3 times"
}

want_hash="$( (cat "$REQS"; "$PY" -V 2>&1) | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.nanoclaw-requirements.sha256"

if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want_hash" ]] \
    && "$VENV/bin/python" -c 'import e2b, e2b_code_interpreter, pytest' >/dev/null 2>&1; then
    mcp_v2
    echo "python-venv: up to date at $VENV" >&2
    echo "$VENV"
    exit 0
fi

if [[ -e "$VENV" ]]; then
    echo "python-venv: rebuilding $VENV (requirements changed or venv incomplete)" >&2
    rm -rf "$VENV"
fi
mkdir -p "$(dirname "$VENV")"

if ! "$PY" -m venv "$VENV" 2>"$VENV.err"; then
    cat "$VENV.err" >&2 || true
    rm -rf "$VENV" "$VENV.err"
    die "could not create a venv with $PY. On Debian/Ubuntu install the venv module first: apt-get install -y python3-venv"
fi
rm -f "$VENV.err"
if [[ ! -x "$VENV/bin/pip" ]]; then
    rm -rf "$VENV"
    die "venv at $VENV has no pip (ensurepip missing). On Debian/Ubuntu: apt-get install -y python3-venv"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
ok=0
for attempt in 1 2 3; do
    if "$VENV/bin/pip" install --quiet --retries 5 --timeout 60 -r "$REQS"; then
        ok=1
        break
    fi
    echo "python-venv: pip install failed (attempt $attempt/3)" >&2
    sleep $((attempt * 5))
done
((ok)) || die "pip install -r $REQS failed 3 times"

"$VENV/bin/python" -c 'import e2b, e2b_code_interpreter, pytest' \
    || die "installed venv cannot import e2b / e2b_code_interpreter / pytest"
echo "$want_hash" >"$stamp"
mcp_v2
echo "python-venv: ready at $VENV ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("e2b", m.version("e2b"), "e2b-code-interpreter", m.version("e2b-code-interpreter"))'))" >&2
echo "$VENV"

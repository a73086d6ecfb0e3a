#!/usr/bin/env bash
# Run the whole suite (DESIGN §10), as root on Debian 12:
#   1. packaging/install.sh --test   Debian runtimes, redis-server, the sandbox venv, the moto venv
#   2. .venv/                        this checkout, editable, with the dev extras (.venv/bin/interpreter)
#   3. ruff check, mypy, pytest      every phase runs; the script fails if any of them failed
# Arguments go to pytest:  ./test.sh -k binary   ./test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

SYSTEM_PYTHON=/usr/bin/python3
VENV=.venv

now_us() { local t=${EPOCHREALTIME//[.,]/}; printf '%s' "$t"; }
fmt_s() { printf '%d.%01d s' $(($1 / 1000000)) $(($1 % 1000000 / 100000)); }

T0=$(now_us)
failed=()
summary=()

# phase NAME COMMAND...: run a phase, print its wall time, remember a failure (pytest's 5, "no tests
# collected", is non-zero and so a failure too).
phase() {
    local name=$1 t0 rc=0
    shift
    printf '\n==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$name"
    t0=$(now_us)
    "$@" || rc=$?
    local took
    took=$(fmt_s $(($(now_us) - t0)))
    if [ "$rc" -eq 0 ]; then
        summary+=("$name: ok ($took)")
    else
        summary+=("$name: FAILED with exit code $rc ($took)")
        failed+=("$name")
    fi
    printf '==> %s: exit %d, %s\n' "$name" "$rc" "$took"
    return "$rc"
}

# The editable install only needs redoing when pyproject.toml changes (code changes are live).
# Runs under `||` (errexit is off there), hence the explicit `|| return`.
make_dev_venv() {
    local marker=$VENV/.pyproject.sha256 digest
    if ! { [ -x "$VENV/bin/python" ] && grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" 2>/dev/null \
        && "$VENV/bin/python" -c '' 2>/dev/null; }; then
        rm -rf "$VENV"
        "$SYSTEM_PYTHON" -m venv "$VENV" || return
    fi
    digest=$({ "$VENV/bin/python" -VV; cat pyproject.toml; } | sha256sum | cut -d' ' -f1)
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$digest" ] && [ -x "$VENV/bin/interpreter" ]; then
        echo "    $VENV is up to date"
        return
    fi
    rm -f "$marker"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --quiet -e '.[dev]' || return
    "$VENV/bin/interpreter" --version || return
    printf '%s\n' "$digest" >"$marker"
}

# Setup failures stop the run: nothing after them could mean anything.
phase "install --test" bash packaging/install.sh --test || exit 1
phase "dev venv ($VENV)" make_dev_venv || exit 1

export MOTO_SERVER_BIN=/opt/interpreter/moto-venv/bin/moto_server
export SANDBOX_VENV=/opt/interpreter/sandbox-venv
export PATH=$PWD/$VENV/bin:$PATH

phase "ruff check" "$VENV/bin/ruff" check . || true
phase "mypy" "$VENV/bin/mypy" || true
phase "pytest" "$VENV/bin/python" -m pytest --durations=30 "$@" || true

printf '\n==> summary (%s)\n' "$(fmt_s $(($(now_us) - T0)))"
printf '    %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[*]}"
    exit 1
fi

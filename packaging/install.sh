#!/usr/bin/env bash
# Install the interpreter on Debian 12, as root (DESIGN §10). Idempotent: a rerun skips what is in place.
#
#   packaging/install.sh             production: Debian packages and runtimes, /opt/interpreter (app venv,
#                                    sandbox venv), /var/lib/code-interpreter, /etc/code-interpreter/env with
#                                    a random API_KEY, the systemd unit; then starts the server (through
#                                    systemd when it is PID 1, otherwise in the foreground)
#   packaging/install.sh --no-start  the same without starting the server
#   packaging/install.sh --test      what the test suite needs: packages, runtimes, the sandbox venv and the
#                                    moto venv; no env file, no unit, nothing started
#
# Everything comes from Debian's apt, PyPI and npm. pip's machine-wide configuration (indexes, constraints)
# applies as it is.
set -euo pipefail
umask 022 # every file under /opt/interpreter must be readable, and every directory traversable, by jails

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/interpreter
# Debian's interpreter, never `python3` on PATH (may be a pyenv build under /root, invisible to jails and
# to a unit with ProtectHome=).
SYSTEM_PYTHON=/usr/bin/python3
STATE_DIR=/var/lib/code-interpreter
CONF_DIR=/etc/code-interpreter
ENV_FILE=$CONF_DIR/env
UNIT_SRC=$REPO/packaging/systemd/interpreter.service
UNIT_DST=/etc/systemd/system/interpreter.service
HEALTH_TIMEOUT_S=90
APT_LOG=/var/log/interpreter-install-apt.log

APT_PACKAGES=(
    python3-venv python3-dev build-essential redis-server
    # sandbox language runtimes
    golang-go rustc cargo php-cli r-base-core r-cran-dplyr r-cran-ggplot2 r-cran-data.table
    gfortran ldc default-jdk-headless g++ gcc bash jq
    # zygote kernels: children compile their seccomp filter with it
    libseccomp2
    # the sandbox network: nsenter, mount and loop devices, mkfs.ext4 for the package caches, CA certificates
    util-linux mount e2fsprogs ca-certificates
)
# What sandboxed Python code can import (DESIGN §3: the kernel imports cloudpickle, numpy, pandas, matplotlib).
SANDBOX_REQUIREMENTS=(
    numpy pandas scipy scikit-learn statsmodels sympy matplotlib seaborn pillow openpyxl python-docx
    pyarrow cloudpickle networkx
)
# The S3 server of the integration tests. Its own venv: it needs a boto3 that the app's aiobotocore pin forbids.
MOTO_REQUIREMENTS=("moto[server]")
# Tools the exploit tests run inside jails to show they are denied (ip, strace, gdb): test mode only.
TEST_APT_PACKAGES=(iproute2 strace gdb)

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

mode=production
start=1

usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case $1 in
        --test) mode="test"; start=0 ;;
        --no-start) start=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

log() { printf '%s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

now_us() { local t=${EPOCHREALTIME//[.,]/}; printf '%s' "$t"; }
fmt_s() { printf '%d.%01d s' $(($1 / 1000000)) $(($1 % 1000000 / 100000)); }

INSTALL_T0=$(now_us)
# step NAME COMMAND...: run one step and print how long it took.
step() {
    local name=$1 t0
    shift
    log "==> $name"
    t0=$(now_us)
    "$@"
    log "    $name: $(fmt_s $(($(now_us) - t0)))"
}

# ---------------------------------------------------------------------------------------------------------
# System packages

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

install_system_packages() {
    local wanted=("${APT_PACKAGES[@]}") missing=() pkg
    # This image has NodeSource's nodejs, which bundles npm and conflicts with Debian's npm package;
    # a stock Debian 12 needs both from apt.
    command -v npm >/dev/null 2>&1 || wanted+=(nodejs npm)
    [ "$mode" != test ] || wanted+=("${TEST_APT_PACKAGES[@]}")
    for pkg in "${wanted[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "    all ${#wanted[@]} packages are installed"
        return
    fi
    log "    installing: ${missing[*]} (log: $APT_LOG)"
    : >"$APT_LOG"
    # No recommends: they add ~250 MB (pandoc, ffmpeg, mesa, r-recommended, ...) that no sandbox uses.
    # dpkg --configure -a: finish what an interrupted earlier run left half-installed. The lock timeout: on a
    # fresh machine apt-daily may hold the lock for a while.
    if ! { dpkg --configure -a && apt-get update -q -o DPkg::Lock::Timeout=600 \
        && apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}"; } \
        </dev/null >>"$APT_LOG" 2>&1; then
        tail -n 40 "$APT_LOG" >&2
        die "apt-get failed (full log: $APT_LOG)"
    fi
}

install_typescript() {
    # TypeScript and Node's type definitions (so programs may use process, require, Buffer, ...).
    if [ -x /usr/bin/tsc ] && [ -d /usr/lib/node_modules/@types/node ]; then
        log "    $(/usr/bin/tsc --version) is installed"
        return
    fi
    npm install -g --prefix /usr --no-fund --no-audit --loglevel=error typescript @types/node </dev/null
    log "    $(/usr/bin/tsc --version)"
}

# ---------------------------------------------------------------------------------------------------------
# Python environments

# make_venv DIR: create DIR as a venv of Debian's Python, unless it already is a working one.
make_venv() {
    local dir=$1
    if [ -x "$dir/bin/python" ] && grep -qx 'home = /usr/bin' "$dir/pyvenv.cfg" 2>/dev/null \
        && "$dir/bin/python" -c '' 2>/dev/null; then
        return
    fi
    [ -x "$SYSTEM_PYTHON" ] || die "$SYSTEM_PYTHON is missing (apt-get install python3)"
    rm -rf "$dir"
    "$SYSTEM_PYTHON" -m venv "$dir"
}

# pip_install_once DIR REQUIREMENT...: pip install into the venv DIR, skipped when a marker records the same
# requirement list (and Python) as installed last time.
pip_install_once() {
    local dir=$1 marker digest
    shift
    marker=$dir/.installed-requirements.sha256
    make_venv "$dir"
    digest=$({ "$dir/bin/python" -VV; printf '%s\n' "$@"; } | sha256sum | cut -d' ' -f1)
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$digest" ]; then
        log "    $dir is up to date ($*)"
        return
    fi
    rm -f "$marker"
    "$dir/bin/pip" install --quiet "$@"
    printf '%s\n' "$digest" >"$marker"
}

SRC_COPY=
trap '[ -z "$SRC_COPY" ] || rm -rf "$SRC_COPY"' EXIT

install_app_venv() {
    make_venv "$PREFIX/venv"
    # Build from a copy of the checkout: an in-tree build would leave root-owned build/ and *.egg-info there.
    SRC_COPY=$(mktemp -d)
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$SRC_COPY" -xf -
    # A local directory is always reinstalled by pip, so a rerun picks up changed code.
    "$PREFIX/venv/bin/pip" install --quiet "$SRC_COPY"
    rm -rf "$SRC_COPY"
    SRC_COPY=
    install -d -m 0755 "$PREFIX/bin"
    ln -sfn ../venv/bin/interpreter "$PREFIX/bin/interpreter"
    log "    $("$PREFIX/bin/interpreter" --version)"
}

install_sandbox_venv() {
    pip_install_once "$PREFIX/sandbox-venv" "${SANDBOX_REQUIREMENTS[@]}"
}

install_moto_venv() {
    pip_install_once "$PREFIX/moto-venv" "${MOTO_REQUIREMENTS[@]}"
    [ -x "$PREFIX/moto-venv/bin/moto_server" ] || die "moto_server is missing from $PREFIX/moto-venv"
}

# nsjail bind sources need o+x on every parent directory, and jails read the sandbox venv as another uid.
fix_permissions() {
    local dir
    for dir in /opt "$PREFIX"; do
        if [ -d "$dir" ]; then chmod o+rx "$dir"; fi
    done
    chmod -R a+rX "$PREFIX"
    find "$PREFIX" -type d ! -perm 0755 -exec chmod 0755 {} +
}

# ---------------------------------------------------------------------------------------------------------
# Production only: state directories, settings, the unit, the start

make_state_dirs() {
    install -d -m 0755 "$STATE_DIR" "$STATE_DIR/data" "$STATE_DIR/sandboxes"
    chmod 0755 "$STATE_DIR" "$STATE_DIR/data" "$STATE_DIR/sandboxes"
}

NEW_API_KEY=
write_env_file() {
    local key tmp
    install -d -m 0755 "$CONF_DIR"
    install -d -m 0700 "$CONF_DIR/ssl"
    if [ -e "$ENV_FILE" ]; then
        log "    keeping the existing $ENV_FILE"
        return
    fi
    key=$("$SYSTEM_PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
    tmp=$(mktemp "$CONF_DIR/.env.XXXXXX") # mktemp creates it 0600
    cat >"$tmp" <<EOF
# Settings of the interpreter service, written once by packaging/install.sh ($(date -u +%Y-%m-%dT%H:%M:%SZ)).
# Reruns of the installer keep this file. Every variable of the configuration guide works here.
API_KEY=$key
API_HOST=0.0.0.0
PORT=8000
DATA_DIR=$STATE_DIR/data
SANDBOX_BASE_DIR=$STATE_DIR/sandboxes
# HTTPS turns on when fullchain.pem and privkey.pem are put here.
SSL_CERTS_PATH=$CONF_DIR/ssl
LOG_FORMAT=json
EOF
    chmod 0600 "$tmp"
    mv -f "$tmp" "$ENV_FILE"
    NEW_API_KEY=$key
    log "    wrote $ENV_FILE"
}

install_unit() {
    install -D -m 0644 "$UNIT_SRC" "$UNIT_DST"
    log "    installed $UNIT_DST"
}

# The value of one variable as systemd sees it: the env file alone (ours and root-only, so sourcing it is safe).
env_value() {
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's
    env -i /bin/bash -c 'set -a; . "$1"; printenv "$2" || true' env_value "$ENV_FILE" "$1"
}

wait_for_health() {
    local port host
    port=$(env_value PORT)
    port=${port:-$(env_value API_PORT)}
    host=$(env_value API_HOST)
    case $host in "" | 0.0.0.0 | :: | "[::]") host=127.0.0.1 ;; esac
    "$SYSTEM_PYTHON" - "$host" "${port:-8000}" "$HEALTH_TIMEOUT_S" <<'PY'
import json, ssl, sys, time, urllib.request

host, port, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
if ":" in host and not host.startswith("["):
    host = f"[{host}]"
context = ssl._create_unverified_context()  # loopback probe; the certificate names the public host
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    for scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=2, context=context) as reply:
                body = json.load(reply)
                print(f"    {scheme}://{host}:{port}/health: {body.get('status')} (version {body.get('version')})")
                sys.exit(0)
        except Exception:
            pass
    time.sleep(0.5)
sys.exit(1)
PY
}

start_with_systemd() {
    systemctl daemon-reload
    systemctl enable --quiet interpreter
    # restart, not `enable --now`: a rerun must run the code it just installed.
    systemctl restart interpreter
    if ! wait_for_health; then
        journalctl -u interpreter -n 50 --no-pager || true
        die "the interpreter service did not answer /health within ${HEALTH_TIMEOUT_S} s"
    fi
}

print_new_key() {
    [ -n "$NEW_API_KEY" ] || return 0
    cat <<EOF

  ==========================================================================
  A new API key was generated (stored in $ENV_FILE; shown only this once):

      API_KEY=$NEW_API_KEY

  Clients send it as the x-api-key header.
  ==========================================================================

EOF
}

# ---------------------------------------------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || die "run as root"
if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
    log "warning: this installer is written for Debian 12 (bookworm)"
fi

log "interpreter install ($mode) from $REPO"
step "system packages" install_system_packages
step "typescript" install_typescript
if [ "$mode" = production ]; then
    step "app venv ($PREFIX/venv)" install_app_venv
fi
step "sandbox venv ($PREFIX/sandbox-venv)" install_sandbox_venv
if [ "$mode" = test ]; then
    step "moto venv ($PREFIX/moto-venv)" install_moto_venv
fi
step "permissions" fix_permissions
if [ "$mode" = production ]; then
    step "state directories" make_state_dirs
    step "settings ($ENV_FILE)" write_env_file
    step "systemd unit" install_unit
fi
log "install ($mode) done in $(fmt_s $(($(now_us) - INSTALL_T0)))"

if [ "$mode" = production ]; then
    print_new_key
fi
[ "$start" -eq 1 ] || exit 0

if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    step "start (systemd)" start_with_systemd
    log "the interpreter service is running: systemctl status interpreter; journalctl -u interpreter"
else
    log "==> start (foreground: systemd is not PID 1); stop with Ctrl-C"
    cd "$STATE_DIR" # no stray ./.env from the checkout
    # A clean environment, as systemd would give: variables of the installing shell (this machine exports
    # SSL_CERT_FILE for OpenSSL, which the server would read as its certificate) must not leak in.
    exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root \
        /bin/bash -c "set -a; . '$ENV_FILE'; set +a; exec '$PREFIX/bin/interpreter' serve"
fi

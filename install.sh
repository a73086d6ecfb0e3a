#!/usr/bin/env bash
# Install and start the interpreter (as root, Debian 12): see packaging/install.sh --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec bash packaging/install.sh "$@"

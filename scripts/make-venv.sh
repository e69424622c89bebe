#!/bin/sh
# Create the project venv: scripts/make-venv.sh PYTHON VENV (called by the Makefile).
# Debian and Ubuntu ship the venv module's pip bootstrap (ensurepip) in a separate package;
# without it `python3.11 -m venv` fails half-way, leaving a venv without pip that later make
# runs would take as installed. Say which package to install and remove the half-made venv.
set -u
python=$1
venv=$2
if ! command -v "$python" >/dev/null 2>&1; then
    echo "make: $python not found: install Python 3.11, or run make PYTHON=/path/to/python3.11" >&2
    exit 1
fi
existed=0
[ -e "$venv" ] && existed=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if "$python" -m venv "$venv" >"$log" 2>&1; then
    exit 0
fi
# Only what this run created is removed.
[ "$existed" -eq 0 ] && rm -rf "$venv"
if grep -q ensurepip "$log"; then
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
    echo "make: $python cannot create a venv (ensurepip is not available): install the python${version:-3}-venv package (e.g. sudo apt-get install python${version:-3}-venv), then run make again" >&2
else
    cat "$log" >&2
fi
exit 1

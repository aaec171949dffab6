#!/usr/bin/env bash
# Creates .venv on first use and installs moe-twin into it. torch is pinned
# first so pip takes the CPU build from this machine's disk (an unpinned torch
# would pull a multi-GB CUDA build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.moe-twin-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "moe-twin: setting up $venv (first use; a few minutes)..." >&2
log="$(mktemp -t moe-twin-setup.XXXXXX)"
if ! {
  python3 -m venv "$venv" &&
  "$venv/bin/python" -m pip install --upgrade pip &&
  "$venv/bin/python" -m pip install "torch==2.13.0" &&
  "$venv/bin/python" -m pip install -e "$root[dev]"
} >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "moe-twin: set-up failed; full log: $log" >&2
  exit 1
fi
rm -f "$log"
echo "$want" > "$stamp"
echo "moe-twin: set-up done." >&2

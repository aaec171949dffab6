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
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet "torch==2.13.0" >&2
"$venv/bin/python" -m pip install --quiet -e "$root[dev]" >&2
echo "$want" > "$stamp"

#!/usr/bin/env bash
# The optional engine extra: install a released vLLM wheel WITHOUT its
# dependencies, plus only the pure-Python packages the import chain of its MoE
# layer code needs, so `moe-twin conform` can run the engine's own code on CPU.
#
#   scripts/install-engine.sh vllm==0.33.0            # .engines/vllm-0.33.0/ (default)
#   scripts/install-engine.sh --into-venv vllm==0.33.0  # into .venv itself
#
# Default layout: one venv per engine version under .engines/ (git-ignored).
# Its site-packages gets a .pth line pointing at the project's .venv
# site-packages, so torch (the CPU build the project pins) and the project's
# dependencies are shared, not downloaded again; the engine-specific packages
# (transformers etc.) live in the engine venv and come first on sys.path.
# Versions that need different transformers releases can then sit side by
# side, and the project's own .venv is never changed. --into-venv is for a
# machine that wants one environment (one engine version only).
#
# Safety: vLLM's dependencies are never resolved by pip (they pull a CUDA
# torch and GBs of GPU libraries); every package already in the project's
# .venv (torch==2.13.0 among them) is a pip constraint, so no install here
# can replace or duplicate it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
into_venv=0
spec=""
for arg in "$@"; do
  case "$arg" in
    --into-venv) into_venv=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    vllm==*) spec="$arg" ;;
    *) echo "install-engine: unknown argument '$arg' (usage: install-engine.sh [--into-venv] vllm==X.Y.Z)" >&2; exit 2 ;;
  esac
done
if [ -z "$spec" ]; then
  echo "install-engine: name a pinned engine, e.g. vllm==0.33.0" >&2
  exit 2
fi
version="${spec#vllm==}"
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "install-engine: '$spec' is not a pinned release (vllm==X.Y.Z)" >&2
  exit 2
fi

# The project's own environment (the README's commands create it on first use).
venv="${MOE_TWIN_VENV:-$root/.venv}"
if [ -z "${MOE_TWIN_VENV:-}" ]; then
  "$root/scripts/bootstrap.sh"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# Packages the MoE runner/config import chain needs (all pure Python or
# prebuilt wheels without torch); transformers takes the release's own range
# (read from the wheel's metadata below).
common=(packaging psutil pyzmq regex numpy pydantic cbor2 aiohttp requests cachetools msgspec
        cloudpickle py-cpuinfo prometheus_client pybase64 einops pyyaml openai fastapi pillow gguf)

if [ "$into_venv" = 1 ]; then
  target="$venv"
else
  target="$root/.engines/vllm-$version"
fi
stamp="$target/.moe-twin-engine-vllm-$version"
if [ -f "$stamp" ]; then
  echo "install-engine: vllm $version already installed in $target" >&2
  exit 0
fi

start=$(date +%s)
log="$(mktemp -t moe-twin-engine.XXXXXX)"
cons="$(mktemp -t moe-twin-engine-cons.XXXXXX)"
trap 'rm -f "$cons"' EXIT
echo "install-engine: vllm $version into $target (log: $log)..." >&2
{
  # Everything the project's .venv already holds stays as it is (shared).
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' | grep '==' || true
  echo "torch==2.13.0"
} >"$cons"
if ! {
  if [ "$into_venv" = 0 ]; then
    mkdir -p "$root/.engines"
    # From the project's interpreter, so the Python version matches torch's build.
    "$venv/bin/python" -m venv --without-pip "$target"
    tsite="$("$target/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$site" > "$tsite/moe-twin-project-venv.pth"
  fi
  pip=("$venv/bin/python" -m pip --python "$target/bin/python")
  wheels="$(mktemp -d -t moe-twin-engine-wheel.XXXXXX)"
  "${pip[@]}" download --no-deps "vllm==$version" -d "$wheels"
  wheel="$(ls "$wheels"/vllm-"$version"-*.whl)"
  transformers="$("$venv/bin/python" - "$wheel" <<'PY'
import sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
print(next(r.split(";")[0].replace(" ", "") for r in reqs if r.startswith("transformers")))
PY
)"
  echo "transformers requirement of vllm $version: $transformers"
  "${pip[@]}" install --no-deps "$wheel"
  rm -rf "$wheels"
  "${pip[@]}" install -c "$cons" "${common[@]}" "$transformers"
  "$target/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
} >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "install-engine: failed; full log: $log" >&2
  exit 1
fi
echo "$spec" > "$stamp"
took=$(( $(date +%s) - start ))
size="$(du -sh "$target" 2>/dev/null | cut -f1)"
echo "install-engine: vllm $version installed in $target (${took} s, ${size}; log: $log)" >&2

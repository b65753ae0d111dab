#!/usr/bin/env bash
# What building and testing the C++ runner needs, installed if missing (safe to run again):
#   system packages  cmake g++ (x86_64 build); g++-aarch64-linux-gnu qemu-user (aarch64 cross
#                    build, run under emulation); clang libclang-rt-14-dev (the request reader's
#                    libFuzzer target with AddressSanitizer + UBSan). apt-get installs them when
#                    run as root on a Debian/Ubuntu machine.
#   aarch64 libs     the executorch wheel for manylinux aarch64 (same version as the project's),
#                    its executorch/{lib,include,share} unpacked into $SPHINX_EXECUTORCH_AARCH64
#                    (default ~/.cache/sphinx-edge/executorch-aarch64/executorch).
# Fails (exit 1) when something is missing and cannot be installed here, saying what to install;
# SPHINX_EDGE_SKIP_DEPS=1 turns that into a warning (the tests that need it then skip, except under CI).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
# Absolute, because the pip download below runs in another directory.
case "$python" in /*) ;; */*) python="$PWD/$python" ;; *) python=$(command -v "$python" || echo "$python") ;; esac
[ -x "$python" ] || { echo "install-deps.sh: no Python at $python (make install creates .venv)" >&2; exit 1; }
missing_tool() {
  echo "install-deps.sh: $*" >&2
  [ "${SPHINX_EDGE_SKIP_DEPS:-0}" = 1 ] && { echo "  (SPHINX_EDGE_SKIP_DEPS=1: going on without it)" >&2; return 0; }
  exit 1
}

packages=(cmake g++ g++-aarch64-linux-gnu qemu-user clang libclang-rt-14-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: present (${packages[*]})"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}"
else
  missing_tool "system packages missing: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" \
    "(or your system's equivalents)"
fi

dest=${SPHINX_EXECUTORCH_AARCH64:-$HOME/.cache/sphinx-edge/executorch-aarch64/executorch}
if [ -f "$dest/lib/libexecutorch.so" ] && [ -f "$dest/share/cmake/executorch-config.cmake" ]; then
  echo "aarch64 ExecuTorch libraries: present in $dest"
  exit 0
fi
version=$("$python" -c "import importlib.metadata as m; print(m.version('executorch'))")
pyver=$("$python" -c "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')")
wheels=$HOME/.cache/sphinx-edge/wheels
mkdir -p "$wheels"
# Only the libraries are used, so any CPython tag of the same release does; ours is tried first.
( cd "$wheels" && "$python" -m pip download "executorch==$version" --platform manylinux_2_28_aarch64 \
    --only-binary=:all: --no-deps --python-version "$pyver" --implementation cp --abi "cp$pyver" -d "$wheels" -q )
wheel=$(ls "$wheels"/executorch-"$version"-*aarch64*.whl | head -1)
"$python" - "$wheel" "$dest" <<'PY'
import pathlib, shutil, sys, zipfile
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.startswith(("executorch/lib/", "executorch/include/", "executorch/share/"))]
    for name in members:
        if name.endswith("/"):
            continue
        target = dest / name.removeprefix("executorch/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(name) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
print(f"aarch64 ExecuTorch libraries: {len(members)} files from {wheel} into {dest}")
PY

#!/usr/bin/env bash
# Build sphinx_runner into build/cpp-<arch> (incremental: a second run with nothing changed only
# checks).  Usage: runtime/cpp/build.sh [x86_64|aarch64]   (default: this machine's arch)
#
#   x86_64 / the host arch: against the executorch wheel of the project's Python (.venv, or $PYTHON)
#   aarch64 on another host: cross-built with g++-aarch64-linux-gnu against the aarch64 wheel's
#                            libraries in $SPHINX_EXECUTORCH_AARCH64 (install-deps.sh fetches them)
# Prints the binary's path last. JOBS sets the parallel jobs (default 2).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
arch=${1:-$(uname -m)}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3

die() { echo "build.sh: $*" >&2; exit 1; }
command -v cmake >/dev/null || die "cmake is not installed; run runtime/cpp/install-deps.sh"

cmake_args=()
if [ "$arch" = "$(uname -m)" ]; then
  command -v g++ >/dev/null || die "g++ is not installed; run runtime/cpp/install-deps.sh"
  # The package directory without importing executorch (that would import torch).
  package=$("$python" -c "import importlib.util as u; s = u.find_spec('executorch'); print(s.submodule_search_locations[0] if s else '')")
  [ -n "$package" ] || die "$python has no executorch package; pip install -e '.[dev]' first"
elif [ "$arch" = aarch64 ]; then
  command -v aarch64-linux-gnu-g++ >/dev/null || die "g++-aarch64-linux-gnu is not installed; run runtime/cpp/install-deps.sh"
  package=${SPHINX_EXECUTORCH_AARCH64:-$HOME/.cache/sphinx-edge/executorch-aarch64/executorch}
  [ -f "$package/lib/libexecutorch.so" ] || die "no aarch64 ExecuTorch libraries in $package; run runtime/cpp/install-deps.sh"
  cmake_args+=(-DCMAKE_TOOLCHAIN_FILE="$here/aarch64-linux-gnu.cmake")
else
  die "unknown arch '$arch': build for $(uname -m) (this machine) or aarch64"
fi

out="$root/build/cpp-$arch"
mkdir -p "$out"
# Configure once; later runs only rebuild what changed (cmake re-runs itself if CMakeLists.txt did).
if [ ! -f "$out/CMakeCache.txt" ] || ! grep -q "^executorch_DIR:PATH=$package/share/cmake$" "$out/CMakeCache.txt"; then
  cmake -S "$here" -B "$out" -DCMAKE_BUILD_TYPE=Release -Dexecutorch_DIR="$package/share/cmake" "${cmake_args[@]}" >"$out/configure.log" 2>&1 \
    || { cat "$out/configure.log" >&2; die "configuring failed (log: $out/configure.log)"; }
fi
cmake --build "$out" -j "${JOBS:-2}" >"$out/build.log" 2>&1 || { cat "$out/build.log" >&2; die "the build failed"; }
echo "$out/sphinx_runner"

#!/usr/bin/env bash
# The peer runtimes of `sphinx-edge bench --peer` (the project's [peers] extra) into a Python
# environment: pip compiles llama.cpp for the CPU it builds on (-march=native).
#   - --no-cache-dir: pip caches that wheel by source, not by CPU, and a wheel compiled on a machine
#     with other CPU features dies with "Illegal instruction" here.
#   - AMX: on this project's CI machines (Intel with AMX, GCC 12) llama.cpp dies with SIGILL on a tile
#     instruction in its AMX matmul. GCC 12's _tile_loadconfig tells the compiler that ldtilecfg reads 8
#     bytes (its asm operand is `*(const void **)config`), so an optimised build drops the stores to the
#     rest of a 64-byte tile configuration built on the stack, as llama.cpp's ggml_tile_config_init
#     builds it, and the first tile instruction finds no configured tile. The probe below is built the way
#     llama.cpp is (optimised) and, where it traps, llama.cpp is built without AMX. (clang 14 compiles
#     the probe correctly but names its macros __AMXINT8__, not __AMX_INT8__, so llama.cpp built with it
#     has no AMX path either.)
# Usage: bash benchmarks/install-peers.sh [python]   (default: .venv/bin/python of the repository)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${1:-$root/.venv/bin/python}
[ -x "$python" ] || { echo "install-peers.sh: no Python at $python (make install creates .venv)" >&2; exit 1; }

amx_runs() (  # exit 0 when a tile instruction executes on this machine (a subshell: its trap and its SIGILL stay in it)
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  cat > "$dir/amx.c" <<'EOF'
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) return 1;
    unsigned char config[64];
    memset(config, 0, sizeof config);
    config[0] = 1;                    /* palette 1 */
    config[16] = 64; config[48] = 16; /* tile 0: 16 rows of 64 bytes */
    _tile_loadconfig(config);
    _tile_zero(0);
    _tile_release();
    return 0;
}
EOF
  ${CC:-cc} -O2 -mamx-tile "$dir/amx.c" -o "$dir/amx" && "$dir/amx"
)

flags=""
if [ "$(uname -m)" = x86_64 ] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null && ! amx_runs 2>/dev/null; then
  echo "install-peers.sh: an optimised AMX program traps here: llama.cpp is built without AMX"
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# CMake takes CFLAGS/CXXFLAGS as its initial compile flags; an explicit -mno-* wins over -march=native.
CFLAGS="${CFLAGS:-} $flags" CXXFLAGS="${CXXFLAGS:-} $flags" \
  "$python" -m pip install -q --no-cache-dir -e "$root[peers]"

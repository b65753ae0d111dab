#!/usr/bin/env bash
# Run the aarch64 build (build/cpp-aarch64/sphinx_runner, from build.sh aarch64) on this x86_64
# machine under qemu-user, with the aarch64 ExecuTorch libraries. Arguments go to sphinx_runner.
#
# QEMU_CPU picks the emulated CPU. Default "max,sme=off": every Armv9 feature a current phone core
# has (SVE2, i8mm, bf16, dotprod) but not SME. With SME on, qemu 7.2 makes XNNPACK take its SME
# kernels and the int4 answers differ from x86_64 and from every other emulated CPU
# (README.md, "aarch64 under qemu"); that needs checking on real SME hardware.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
libs=${SPHINX_EXECUTORCH_AARCH64:-$HOME/.cache/sphinx-edge/executorch-aarch64/executorch}/lib
runner=$root/build/cpp-aarch64/sphinx_runner
[ -x "$runner" ] || { echo "qemu-aarch64.sh: no $runner; run runtime/cpp/build.sh aarch64" >&2; exit 2; }
command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64.sh: qemu-user is not installed; run runtime/cpp/install-deps.sh" >&2; exit 2; }
LD_LIBRARY_PATH=$libs exec qemu-aarch64 -cpu "${QEMU_CPU:-max,sme=off}" -L /usr/aarch64-linux-gnu "$runner" "$@"

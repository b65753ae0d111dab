#!/usr/bin/env bash
# Build the request reader's libFuzzer target (clang: ASan + UBSan, any finding aborts) and run it.
#   runtime/cpp/fuzz/fuzz.sh SECONDS [CORPUS_DIR ...]
# Seeds come from the corpus directories (a test writes real requests there) and the kept
# regression inputs in runtime/cpp/fuzz/regressions, which always run first. A crash leaves its
# input as build/fuzz/crash-*: copy it into regressions/ with the fix. Needs clang and
# libclang-rt-14-dev (install-deps.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
seconds=${1:?usage: fuzz.sh SECONDS [CORPUS_DIR ...]}
shift
clang=${CLANGXX:-$(command -v clang++ || command -v clang++-14 || true)}
[ -n "$clang" ] || { echo "fuzz.sh: clang++ is not installed; run runtime/cpp/install-deps.sh" >&2; exit 1; }
out="$root/build/fuzz"
mkdir -p "$out/corpus"
bin="$out/fuzz_request"
if [ ! -x "$bin" ] || [ "$here/fuzz_request.cpp" -nt "$bin" ] || [ "$here/../request.h" -nt "$bin" ]; then
  "$clang" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -fno-omit-frame-pointer "$here/fuzz_request.cpp" -o "$bin.tmp"
  mv "$bin.tmp" "$bin"
fi
cd "$out"
# The kept regressions first, one run each: any of them failing again is a regression.
"$bin" -runs=1 "$here"/regressions/* >"$out/regressions.log" 2>&1 || { cat "$out/regressions.log" >&2; exit 1; }
# -max_len covers the seed requests (a few MB of pixels); -rss_limit_mb keeps a run within the machine.
exec "$bin" -max_total_time="$seconds" -max_len=4194304 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
  "$out/corpus" "$@"

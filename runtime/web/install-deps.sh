#!/usr/bin/env bash
# Installs what the browser demo and its tests need; safe to run again (CI calls it):
#   - Debian's chromium (apt-get, when root), not a Playwright browser download;
#   - Node.js + npm when missing (same rule);
#   - the npm packages pinned in package-lock.json, into runtime/web/node_modules.
# Fails (exit 1) when something is missing and cannot be installed here, saying what to install;
# SPHINX_EDGE_SKIP_DEPS=1 turns that into a warning (the tests that need it then skip, except under CI).
set -euo pipefail
cd "$(dirname "$0")"

missing_tool() {
  echo "install-deps.sh: $*" >&2
  [ "${SPHINX_EDGE_SKIP_DEPS:-0}" = 1 ] && { echo "  (SPHINX_EDGE_SKIP_DEPS=1: going on without it)" >&2; return 0; }
  exit 1
}
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

chromium_bin="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$chromium_bin" ]; then
  echo "chromium: $("$chromium_bin" --version 2>/dev/null || echo "$chromium_bin")"
elif can_apt; then
  apt_install chromium
else
  missing_tool "chromium is missing: install it (Debian: apt-get install chromium) or set CHROMIUM=/path/to/chromium"
fi

if ! command -v npm >/dev/null; then
  if can_apt; then
    apt_install nodejs npm
  else
    missing_tool "Node.js >= 20 and npm are missing: install them (nodejs.org, or Debian: apt-get install nodejs npm)"
    exit 0  # nothing below works without npm
  fi
fi
# playwright-core 1.65 needs Node.js 20 (Debian 12's own nodejs is 18: use NodeSource or nodejs.org there).
node -e 'if (+process.versions.node.split(".")[0] < 20) { console.error(`Node.js ${process.version} is too old: need >= 20`); process.exit(1); }'

# npm ci installs exactly the lock file; skipped when node_modules already matches it.
if [ node_modules/.package-lock.json -nt package-lock.json ] && npm ls --all >/dev/null 2>&1; then
  echo "npm packages: up to date"
else
  npm ci --no-audit --no-fund
fi
version() { node -p "JSON.parse(require('fs').readFileSync('node_modules/$1/package.json')).version"; }
echo "onnxruntime-web $(version onnxruntime-web), playwright-core $(version playwright-core)"

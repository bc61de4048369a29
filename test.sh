#!/usr/bin/env bash
# README command 2: runs the whole test suite against PostgreSQL and Redis on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing Debian's chromium for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium; browser tests will fail" >&2
fi
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/15}
export VAR_DIR=${VAR_DIR:-$(mktemp -d /tmp/melanoma-test-var.XXXXXX)}
export NO_ALBUMENTATIONS_UPDATE=1
exec .venv/bin/python -m pytest "$@"

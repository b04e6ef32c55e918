#!/usr/bin/env bash
# Fails when generated/ is not exactly what protos/ produce with the pinned tools.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/generate.sh >/dev/null
if ! git diff --exit-code --stat -- generated; then
  echo "generated/ drifted from protos/: run 'make generate' and commit" >&2
  exit 1
fi
untracked=$(git ls-files --others --exclude-standard -- generated)
if [ -n "$untracked" ]; then
  echo "untracked generated files: $untracked" >&2
  exit 1
fi
echo "generated/ is up to date"

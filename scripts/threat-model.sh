#!/bin/sh
# Assemble docs/threat-model.md from the per-area fragments in docs/threat/.
set -eu
cd "$(dirname "$0")/.."
{
  for f in docs/threat/*.md; do cat "$f"; echo; done
} > docs/threat-model.md

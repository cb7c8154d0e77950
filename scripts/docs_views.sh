#!/usr/bin/env bash
# The live views embedded in the documentation's view page (docs/view.md): the two commands that
# page shows, run on docs/_static/views/prompts.txt, their view.html copied into docs/_static/views/.
# About 20 s on two cores.
#
#     scripts/docs_views.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SINKSCOPE=${SINKSCOPE:-.venv/bin/sinkscope}
VIEWS=docs/_static/views
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$SINKSCOPE" measure --model smollm2-135m --prompts "$VIEWS/prompts.txt" --out "$tmp/sinks-out"
"$SINKSCOPE" intervene --model smollm2-135m --prompts "$VIEWS/prompts.txt" --intervention "isolate:layers=0-3,queries=14" \
    --control random --out "$tmp/effect-out"
cp "$tmp/sinks-out/view.html" "$VIEWS/measure.html"
cp "$tmp/effect-out/view.html" "$VIEWS/effect.html"
echo "wrote $VIEWS/measure.html and $VIEWS/effect.html"

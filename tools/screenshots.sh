#!/usr/bin/env bash
# Build the docs site and photograph four of its pages with headless Chromium, to look at them as a
# reader would (figures load, tables and formulas render, no dead links). Not a test.
#   tools/screenshots.sh [OUT_DIR]        (default: ./screenshots; needs `chromium` and ".[docs]")
# Debian/Ubuntu: apt-get install -y chromium
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-screenshots}")"
mkdir -p "$out"
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome)"
# file:// pages: material's search needs a server, nothing else does; the site loads nothing from
# the network.
for page in index:"" diagnose:diagnose/ benchmarks:benchmarks/ results-init-cpu-w256:results/init-cpu-w256/; do
    name="${page%%:*}"; path="${page#*:}"
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2400 \
        --screenshot="$out/$name.png" "file://$site/${path}index.html" 2>/dev/null
    echo "wrote $out/$name.png"
done
echo "site: $site (open file://$site/index.html)"

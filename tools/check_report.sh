#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium, fails on any console message (the page has
# no scripts, so any message is an error: a parse error, a blocked load) or on any reference to
# a file or address outside the page, and writes a screenshot.
#
#   tools/check_report.sh runs/quickstart [report.png]
#
# Needs Debian's `chromium` (apt-get install chromium); CHROMIUM overrides the binary.
set -euo pipefail
run_dir=${1:?usage: tools/check_report.sh RUN_DIR [SCREENSHOT.png]}
png=${2:-$run_dir/report.png}
page=$run_dir/report.html
browser=${CHROMIUM:-chromium}
command -v "$browser" >/dev/null || { echo "no $browser on PATH: apt-get install chromium" >&2; exit 2; }
[ -f "$page" ] || { echo "$page does not exist: run \`kdllm report $run_dir\` first" >&2; exit 2; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Self-contained: nothing to fetch (headless Chromium does not log a missing image, so look).
if grep -nE '(src|href)=|url\(' "$page" >&2; then
  echo "$page loads something from outside itself" >&2
  exit 1
fi
# --enable-logging=stderr prints every console message, whatever its level, as
# `...:INFO:CONSOLE:line] "text", source: ...`.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --enable-logging=stderr --v=0 \
  --window-size=1400,3400 --screenshot="$png" "file://$(realpath "$page")" 2>"$log" >/dev/null
console=$(grep -E ':CONSOLE[:(]' "$log" || true)
if [ -n "$console" ]; then
  echo "console errors in $page:" >&2
  echo "$console" >&2
  exit 1
fi
[ -s "$png" ] || { echo "no screenshot was written; chromium said:" >&2; cat "$log" >&2; exit 1; }
echo "rendered $page with no console errors; screenshot $png"

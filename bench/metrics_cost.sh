#!/usr/bin/env bash
# What the metrics endpoint costs: hello req/s with 2 workers, metrics on (scraped every second, like a
# Prometheus at a 1 s interval) vs --metrics-bind none, wrk -t1 -c64 -d10s, 3 interleaved rounds per mode.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3 -m balancer --workers 2 --bind 127.0.0.1:18610 --metrics-bind 127.0.0.1:18611 \
    --control-socket "$tmp/on.sock" >"$tmp/on.log" 2>&1 & on=$!
python3 -m balancer --workers 2 --bind 127.0.0.1:18620 --metrics-bind none \
    --control-socket "$tmp/off.sock" >"$tmp/off.log" 2>&1 & off=$!
( for _ in $(seq 1 300); do curl -sf -o /dev/null http://127.0.0.1:18611/metrics || true; sleep 1; done ) & scraper=$!
trap 'kill $scraper $on $off 2>/dev/null; wait; rm -rf "$tmp"' EXIT
for _ in $(seq 1 150); do
    curl -sf -o /dev/null http://127.0.0.1:18610/ && curl -sf -o /dev/null http://127.0.0.1:18620/ && break
    sleep 0.2
done
rps() { wrk -t1 -c64 "$@" | awk '/Requests\/sec/ {print $2}'; }
for mode in keep-alive close; do
    hdr=(); [ "$mode" = close ] && hdr=(-H 'Connection: close')
    rps -d3s "${hdr[@]}" http://127.0.0.1:18610/ >/dev/null; rps -d3s "${hdr[@]}" http://127.0.0.1:18620/ >/dev/null
    for round in 1 2 3; do
        a=$(rps -d10s "${hdr[@]}" http://127.0.0.1:18610/); b=$(rps -d10s "${hdr[@]}" http://127.0.0.1:18620/)
        echo "$mode round $round: metrics on $a req/s, metrics off $b req/s"
    done
done

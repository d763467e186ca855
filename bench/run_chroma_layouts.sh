#!/usr/bin/env bash
# Runs bench/chroma_layouts against a Chroma of its own (fresh data folder,
# free loopback port, niced), growing one store through the given user counts,
# and appends one JSON object per stage to OUT. Chroma is stopped and its data
# removed on every exit, failure included.
#
#   bench/run_chroma_layouts.sh OUT LAYOUT SHARDS "1000 5000 10000" [extra chroma_layouts flags...]
#
# Example: bench/run_chroma_layouts.sh bench/results/chroma-layouts.json shards 32 "1000 5000 10000"
set -euo pipefail
out=$1 layout=$2 shards=$3 sizes=$4
shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BUILD:-$here/build}/bin/chroma_layouts
chroma=$here/.venv/chroma/bin/chroma
dir=$(mktemp -d "${TMPDIR:-/tmp}/chroma-layouts-XXXXXX")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

ANONYMIZED_TELEMETRY=False nice "$chroma" run --path "$dir/data" --host 127.0.0.1 --port "$port" \
  >"$dir/chroma.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/api/v2/heartbeat" >/dev/null && break
  sleep 0.2
done
curl -fs "http://127.0.0.1:$port/api/v2/heartbeat" >/dev/null || { tail -20 "$dir/chroma.log" >&2; exit 1; }

from=0
status=0
for to in $sizes; do
  echo "run_chroma_layouts: $layout shards=$shards users $from..$to $*" >&2
  nice "$bin" --url "http://127.0.0.1:$port" --layout "$layout" --shards "$shards" --from "$from" --to "$to" \
    --pid "$pid" --data-dir "$dir/data" "$@" >>"$out" || status=$?
  from=$to
done
grep -ci "error" "$dir/chroma.log" | sed 's/^/run_chroma_layouts: chroma log error lines: /' >&2 || true
exit $status

#!/usr/bin/env bash
# Prices telemetry and the audit trail: the same load against `tributary demo` on loopback with
# each of them on and off, interleaved in rounds in one run so the machine's drift hits all alike.
# Needs wrk (Debian: apt-get install wrk). Usage: docs/benchmarks/observability.sh [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-15}; rounds=${2:-3}; conns=${CONNS:-32}
cargo build --release --quiet --bin tributary --example otlp_sink
bin=target/release/tributary
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

target/release/examples/otlp_sink 127.0.0.1:14318 >"$work/sink.log" &
cat >"$work/load.lua" <<'LUA'
local paths = {}
for line in io.lines(os.getenv("PATIENTS")) do
  paths[#paths + 1] = "/fhir/Patient/" .. line:match("^(%d+)") .. "/$everything"
end
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
local i = math.random(#paths)
request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end
LUA

# name | audit mode | OTLP: no, yes (every trace sampled) or a sampling ratio
configs=("baseline|off|no" "telemetry|off|yes" "telemetry-10pct|off|0.1" "audit|durable|no"
         "audit-no-sync|no-sync|no" "both|durable|yes")
# ONLY=regex runs a subset, e.g. ONLY='^(baseline|audit)$' CONNS=128
configs=($(printf '%s\n' "${configs[@]}" | grep -E "^(${ONLY:-.*})\|"))
run() { # name audit otlp round
  local name=$1 audit=$2 otlp=$3 dir="$work/$1-$4"; mkdir -p "$dir"
  local env=(OTEL_SDK_DISABLED=true)
  [ "$otlp" = yes ] && env=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:14318 OTEL_TRACES_SAMPLER=always_on)
  [ "$otlp" != yes ] && [ "$otlp" != no ] && env=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:14318
    OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG="$otlp")
  env "${env[@]}" RUST_LOG=warn "$bin" demo --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19090 \
    --practices 20 --patients 10000 --audit-dir "$dir/audit" --unsafe-audit "$audit" \
    --patients-out "$dir/patients.txt" >"$dir/out.log" 2>"$dir/err.log" &
  local pid=$!
  for _ in $(seq 200); do grep -q 'Tributary is ready' "$dir/out.log" 2>/dev/null && break; sleep 0.1; done
  local token; token=$(grep '^token eyJ' "$dir/out.log" | cut -d' ' -f2)
  # Warm up, then measure.
  PATIENTS="$dir/patients.txt" TOKEN=$token wrk -t2 -c"$conns" -d3s -s "$work/load.lua" http://127.0.0.1:18080 >/dev/null
  PATIENTS="$dir/patients.txt" TOKEN=$token wrk -t2 -c"$conns" -d"${secs}s" --latency -s "$work/load.lua" \
    http://127.0.0.1:18080 >"$dir/wrk.txt"
  # What the audit writer did: mean group-commit time and size.
  curl -s --noproxy '*' http://127.0.0.1:19090/metrics | awk -v n="$name" '
    /^tributary_audit_commit_duration_seconds_sum/ {s=$2} /^tributary_audit_commit_duration_seconds_count/ {c=$2}
    /^tributary_audit_commit_records_sum/ {r=$2}
    END { if (c > 0) printf "  %s: %d commits, mean %.2f ms, mean %.1f records each\n", n, c, 1000*s/c, r/c }' >&2
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local rps p50 p99 non2xx
  rps=$(awk '/^Requests\/sec/ {print $2}' "$dir/wrk.txt")
  p50=$(awk '$1=="50%" {print $2}' "$dir/wrk.txt"); p99=$(awk '$1=="99%" {print $2}' "$dir/wrk.txt")
  non2xx=$(awk '/Non-2xx/ {print $4}' "$dir/wrk.txt"); non2xx=${non2xx:-0}
  echo "$name $4 $rps $p50 $p99 $non2xx" | tee -a "$work/results"
}
echo "config round req/s p50 p99 non2xx"
for r in $(seq "$rounds"); do
  for c in "${configs[@]}"; do IFS='|' read -r n a o <<<"$c"; run "$n" "$a" "$o" "$r"; done
done
echo; echo "OTLP sink received: $(curl -s --noproxy '*' http://127.0.0.1:14318/stats)"
echo; echo "nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# Medians per config, and ratios against the baseline of the same run.
python3 - "$work/results" <<'PY'
import sys, statistics as st, collections
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    n, r, rps, p50, p99, bad = line.split()
    rows[n].append((float(rps), ms(p50), ms(p99), int(bad)))
base = rows["baseline"]
b_rps, b_p99 = st.median(x[0] for x in base), st.median(x[2] for x in base)
print("\n| config | req/s (median) | p50 ms | p99 ms | req/s vs baseline | p99 vs baseline | non-2xx |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for n, xs in rows.items():
    rps, p50, p99 = (st.median(x[i] for x in xs) for i in range(3))
    print(f"| {n} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {100*(rps/b_rps-1):+.1f} % | {p99-b_p99:+.2f} ms | {sum(x[3] for x in xs)} |")
PY

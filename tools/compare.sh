#!/usr/bin/env bash
# Side-by-side: Noomnim (embedded store, fsynced), the no-op ceiling and InspIRCd 3 on the same
# shapes with the same generator (`noomnim-load`, `--irc` for InspIRCd), systems alternated run
# by run. Server CPU is utime+stime from /proc/PID/stat over storm and drain.
#
# Usage: tools/compare.sh [RUNS]            (default 3 runs per system and scenario)
# Environment: SECONDS_PER_RUN (default 8), SCENARIOS (default "a300 a a1500 a3000 b"),
#              SYSTEMS (default "embedded noop inspircd").
# Scenarios: a = 1000 clients, 10 groups, 50 senders at full speed; a300 / a1500 / a3000 = the
# same at a steady 300 / 1,500 / 3,000 msg/s (a300: a quiet server, where latency is the figure); b = one group of 1000, 10 senders, full speed; c = 10,000
# idle logged-in connections in 100 groups/channels: server memory per connection (RSS growth).
# Needs: apt-get (InspIRCd is installed if missing), root or the `irc` user to run InspIRCd.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
seconds="${SECONDS_PER_RUN:-8}"
scenarios="${SCENARIOS:-a300 a a1500 a3000 b}"
systems="${SYSTEMS:-embedded noop inspircd}"
state="$(mktemp -d)"
results="$state/results.tsv"
idle_results="$state/idle.tsv"
touch "$results" "$idle_results"
trap 'pkill -f "$state/inspircd.conf" 2>/dev/null || true; rm -rf "$state"' EXIT

if ! command -v inspircd >/dev/null && [ ! -x /usr/sbin/inspircd ]; then
    echo "compare: installing inspircd" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq inspircd >/dev/null
    # The package starts a system instance on 6667; the benchmark runs its own.
    $SUDO systemctl stop inspircd 2>/dev/null || true
fi
cargo build --release --quiet
case " $systems " in *" noop "*)
    cargo build --release --quiet --features bench-noop --target-dir target/noop ;;
esac

flags_for() {
    case "$1" in
        a) echo "--clients 1000 --groups 10 --senders 50" ;;
        a300) echo "--clients 1000 --groups 10 --senders 50 --rate 300" ;;
        a1500) echo "--clients 1000 --groups 10 --senders 50 --rate 1500" ;;
        a3000) echo "--clients 1000 --groups 10 --senders 50 --rate 3000" ;;
        b) echo "--clients 1000 --groups 1 --senders 10" ;;
        c) echo "--clients 10000 --groups 100 --idle" ;;
    esac
}

# record SYSTEM SCENARIO OUTPUT: one TSV row from the generator's report.
record() {
    local out="$3" delivered p50 p99 cpu lost
    if [ "$2" = c ]; then # idle connections: bytes of server memory per connection
        per="$(grep -o 'bytes_per_connection=[0-9]*' <<<"$out" | cut -d= -f2)"
        printf '%s\t%s\n' "$1" "${per:-?}" >>"$idle_results"
        echo "  $1/c: bytes_per_connection=${per:-?}" >&2
        return
    fi
    delivered="$(grep -o 'delivered/s=[0-9]*' <<<"$out" | cut -d= -f2)"
    p50="$(grep -o 'p50=[0-9.]*' <<<"$out" | cut -d= -f2)"
    p99="$(grep -o 'p99=[0-9.]*' <<<"$out" | cut -d= -f2)"
    cpu="$(grep -o 'server_cpu_us_per_delivery=[0-9.]*' <<<"$out" | cut -d= -f2)"
    lost="$(grep -o 'lost=[0-9]*' <<<"$out" | cut -d= -f2)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "${delivered:-0}" "${p50:-0}" "${p99:-0}" "${cpu:-0}" "${lost:-?}" >>"$results"
    echo "  $1/$2: delivered/s=${delivered:-?} p50=${p50:-?} p99=${p99:-?} cpu_us/delivery=${cpu:-?} lost=${lost:-?}" >&2
}

run_inspircd() {
    local scenario="$1" pid out
    sed "s|@STATE@|$state|g" tools/inspircd-bench.conf >"$state/inspircd.conf"
    echo "noomnim benchmark peer" >"$state/motd.txt"
    rm -f "$state/inspircd.pid" "$state/inspircd.log"
    chmod 0777 "$state"; chmod 0644 "$state/inspircd.conf" "$state/motd.txt"
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u irc -- /usr/sbin/inspircd --nofork --config "$state/inspircd.conf" >/dev/null 2>&1 &
    else
        /usr/sbin/inspircd --nofork --config "$state/inspircd.conf" >/dev/null 2>&1 &
    fi
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/6797) 2>/dev/null && break; sleep 0.05; done
    pid="$(pgrep -f "$state/inspircd.conf" | tail -1)"
    # shellcheck disable=SC2046
    out="$(target/release/noomnim-load --irc --addr 127.0.0.1:6797 --server-pid "$pid" --seconds "$seconds" --tag "i$RANDOM" $(flags_for "$scenario") 2>&1)" || true
    kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    if grep -qiE "Excess Flood|SendQ exceeded|RecvQ" "$state/inspircd.log" 2>/dev/null; then
        echo "compare: InspIRCd throttled a client; its figures are void" >&2
        out="delivered/s=0"
    fi
    record inspircd "$scenario" "$out"
}

run_noomnim() {
    local system="$1" scenario="$2" rate="" base out
    case "$scenario" in a300) rate=300 ;; a1500) rate=1500 ;; a3000) rate=3000 ;; esac
    base="${scenario%%[0-9]*}"
    out="$(RATE="$rate" SECONDS_PER_RUN="$seconds" bash tools/bench.sh "$system" "$base" 2>&1)" || true
    record "$system" "$scenario" "$out"
}

for scenario in $scenarios; do
    for run in $(seq 1 "$runs"); do
        echo "compare: $scenario run $run/$runs" >&2
        for system in $systems; do
            case "$system" in
                inspircd) run_inspircd "$scenario" ;;
                *) run_noomnim "$system" "$scenario" ;;
            esac
        done
    done
done

[ -s "$results" ] && python3 - "$results" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
table = {}
for system, scenario, delivered, p50, p99, cpu, lost in rows:
    table.setdefault((scenario, system), []).append((float(delivered), float(p50), float(p99), float(cpu), lost))
med = statistics.median
print("| scenario | system | deliveries/s min / median / max | p50 / p99 ms (median) | server CPU µs per delivery (median) | lost |")
print("|---|---|---|---|---|---|")
scenarios = []
for scenario, _ in table:
    if scenario not in scenarios:
        scenarios.append(scenario)
for scenario in scenarios:
    for (s, system), runs in table.items():
        if s != scenario:
            continue
        d = [r[0] for r in runs]
        print(f"| {scenario} | {system} | {min(d):,.0f} / {med(d):,.0f} / {max(d):,.0f} | "
              f"{med([r[1] for r in runs]):.1f} / {med([r[2] for r in runs]):.1f} | "
              f"{med([r[3] for r in runs]):.2f} | {','.join(sorted(set(r[4] for r in runs)))} |")
    bar = table.get((scenario, "inspircd"))
    if bar:
        for system in ("embedded", "noop"):
            mine = table.get((scenario, system))
            if mine:
                print(f"| {scenario} | {system} / inspircd | deliveries {med([r[0] for r in mine]) / max(med([r[0] for r in bar]), 1):.2f}x | "
                      f"p99 {med([r[2] for r in mine]) / max(med([r[2] for r in bar]), 1e-9):.2f}x | "
                      f"CPU {med([r[3] for r in mine]) / max(med([r[3] for r in bar]), 1e-9):.2f}x | |")
PY

if [ -s "$idle_results" ]; then
    python3 - "$idle_results" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
per = {}
for system, value in rows:
    if value.isdigit():
        per.setdefault(system, []).append(int(value))
print()
print("| c: 10,000 idle logged-in connections | server memory per connection (median of runs) |")
print("|---|---|")
for system, values in per.items():
    print(f"| {system} | {statistics.median(values):,.0f} bytes ({', '.join(f'{v:,}' for v in values)}) |")
PY
fi

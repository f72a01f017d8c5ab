#!/usr/bin/env bash
# Runs `fieldgate run` against `fieldgate simulate --wire-time` (a bench map,
# the 4 x 50 point one by default) and a local mosquitto for DURATION
# seconds, then reports the daemon's RSS, CPU seconds and bytes written to
# disk. Usage: scripts/bench-daemon.sh [SECONDS] [BAUD] [POLL] [MAP]
# (FIELDGATE_BIN measures another build.) API=off runs without the local
# API, API=idle (the default) with it and no client, API=load with a client
# scraping /metrics every second and holding a trace open; API=none adds no
# [api] section (for builds before it).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-600} baud=${2:-9600} poll=${3:-2s} map=${4:-config/bench-4x50.toml}
bin=${FIELDGATE_BIN:-target/release/fieldgate}
sim_bin=target/release/fieldgate
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

sed -e "s/^baud = .*/baud = $baud/" -e "s/^poll = .*/poll = \"$poll\"/" "$map" > "$work/sim.toml"
"$sim_bin" --config "$work/sim.toml" simulate --wire-time > "$work/sim.out" &
for _ in $(seq 50); do grep -q '^bus ' "$work/sim.out" && break; sleep 0.1; done
pty=$(awk '/^bus /{print $3; exit}' "$work/sim.out")

sed -e "s|^port = \"/dev/ttyUSB0\"|port = \"$pty\"|" -e "s/^port = 1883/port = $port/" \
    -e "s|^data_dir = .*|data_dir = \"$work/data\"|" "$work/sim.toml" > "$work/run.toml"
api=${API:-idle}
api_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
case "$api" in
    none) ;;
    off) printf '\n[api]\nlisten = ""\n' >> "$work/run.toml" ;;
    *) printf '\n[api]\nlisten = "127.0.0.1:%s"\n' "$api_port" >> "$work/run.toml" ;;
esac
mosquitto_sub -p "$port" -t '#' > "$work/received" &
RUST_LOG=warn "$bin" --config "$work/run.toml" run 2> "$work/run.log" &
pid=$!
if [ "$api" = load ]; then
    sleep 1
    curl -sN "http://127.0.0.1:$api_port/api/v1/trace" > "$work/trace" &
    (while sleep 1; do curl -s "http://127.0.0.1:$api_port/metrics" > /dev/null; done) &
fi
sleep "$duration"

tck=$(getconf CLK_TCK)
read -r utime stime < <(awk '{print $14, $15}' "/proc/$pid/stat")
rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
msgs=$(wc -l < "$work/received")
written=$(awk '/^write_bytes/{print $2}' "/proc/$pid/io")
echo "map=$map duration_s=$duration baud=$baud poll=$poll bin=$bin api=$api"
[ "$api" = load ] && echo "trace_events_received=$(grep -c '^data:' "$work/trace" || true)"
echo "messages_received=$msgs"
echo "rss_kib=$rss peak_rss_kib=$hwm"
echo "cpu_s=$(echo "scale=2; ($utime + $stime) / $tck" | bc) (user $(echo "scale=2; $utime/$tck" | bc), system $(echo "scale=2; $stime/$tck" | bc))"
echo "disk_write_bytes=$written ($(echo "scale=1; $written / ($msgs + 1)" | bc) per message)"
echo "warnings_logged=$(grep -c WARN "$work/run.log" || true)"

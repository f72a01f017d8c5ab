#!/usr/bin/env bash
# Usage: scripts/rss.sh BIN [ENV...]: RSS of `BIN run` after 20 s polling
# config/bench-2x10.toml from the simulator (wire time) into mosquitto.
# Run from the repo root after `cargo build --release`.
bin=$1; shift
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' $port > $work/m.conf
mosquitto -c $work/m.conf >/dev/null 2>&1 & mpid=$!
sed -e "s/^poll = .*/poll = \"1s\"/" config/bench-2x10.toml > $work/sim.toml
target/release/fieldgate --config $work/sim.toml simulate --wire-time > $work/sim.out & spid=$!
sleep 1; pty=$(awk '/^bus /{print $3; exit}' $work/sim.out)
sed -e "s|^port = \"/dev/ttyUSB0\"|port = \"$pty\"|" -e "s/^port = 1883/port = $port/" -e "s|^data_dir = .*|data_dir = \"$work/data\"|" $work/sim.toml > $work/run.toml
env "$@" RUST_LOG=warn $bin --config $work/run.toml run 2>$work/log & pid=$!
sleep 20; awk -v b=$bin '/^[0-9a-f]/{name=$6; perm=$2} /^Rss/{ if (name ~ /fieldgate$/) print perm, $2}' /proc/$pid/smaps
grep -E "VmRSS|RssAnon|RssFile" /proc/$pid/status | tr '\n' ' '; echo
kill $pid $spid $mpid; wait 2>/dev/null; rm -rf $work

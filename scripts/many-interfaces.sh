#!/bin/bash
# many-interfaces.sh N [DAEMON]: start-up, idle CPU and peak RSS of the
# daemon (standalone, without -interface) in a new network namespace with N
# idle veth pairs (2N interfaces). Root; the namespace is removed at the end.
set -euo pipefail
N=${1:?usage: many-interfaces.sh N [daemon binary]}
D=${2:-bin/packet-headers}
NS=phmany$$
DATA=$(mktemp -d)
LOG=$DATA.log
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; ip netns del "$NS" 2>/dev/null; rm -rf "$DATA" "$LOG"; }
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
B=$(mktemp)
for i in $(seq 1 "$N"); do
  echo "link add va$i type veth peer name vb$i"; echo "link set va$i up"; echo "link set vb$i up"
done > "$B"
[ "$N" -gt 0 ] && ip -n "$NS" -batch "$B"
rm -f "$B"
T0=$(date +%s%N)
ip netns exec "$NS" "$D" -datadir "$DATA" -prometheusx.listen-address 127.0.0.1:9995 >"$LOG" 2>&1 &
PID=$!
until grep -q 'msg=started' "$LOG"; do kill -0 "$PID" || { cat "$LOG"; exit 1; }; sleep 0.01; done
echo "start-up: $(( ($(date +%s%N) - T0) / 1000000 )) ms"
sleep 2
cpu() { local t=0; for f in /proc/$PID/task/*/schedstat; do read -r a _ < "$f"; t=$((t + a)); done; echo $t; }
a=$(cpu); sleep 20; b=$(cpu)
echo "idle CPU: $(( (b - a) / 20000 )) us/s"
grep VmHWM /proc/$PID/status
kill "$PID"; wait "$PID" || true; PID=

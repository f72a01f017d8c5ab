#!/usr/bin/env python3
"""Interop: fieldgate against implementations that are not ours.

The slave is pymodbus (PyPI) on one end of a socat pty pair, the broker is
mosquitto (Debian). Register contents and expected values are computed here
with Python's `struct`, never with fieldgate's encoder. Checks both MQTT
profiles and `fieldgate read`; the local API's `/metrics` goes through
Python's Prometheus parser and the console through Chromium (console.py).

Usage: interop.py PATH-TO-FIELDGATE-BINARY
"""

import asyncio
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
from prometheus_client.parser import text_string_to_metric_families
from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

import console

FIELDGATE = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug/fieldgate")
RESULTS = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    RESULTS["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if not ok and detail else ""))


def words(fmt, value):
    """Big-endian registers of `value` packed with struct format `fmt`."""
    raw = struct.pack(fmt, value)
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]


def ordered(regs, order):
    """Registers as a device with byte order `order` puts them on the wire."""
    if order in ("CDAB", "DCBA"):
        regs = list(reversed(regs))
    if order in ("BADC", "DCBA"):
        regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
    return regs


# (name, area, address, type, order, extra TOML, registers or bits, expected value)
POINTS = []


def reg_point(name, area, address, ty, fmt, value, order="ABCD", extra="", expect=None):
    regs = ordered(words(fmt, value), order)
    if expect is None:
        expect = struct.unpack(fmt, struct.pack(fmt, value))[0]
    POINTS.append((name, area, address, ty, order, extra, regs, expect))


# Meter (unit 1, the gateway's own attributes). Gaps between groups are
# unmapped on the pymodbus side, so a read across them is refused.
reg_point("v_u16", "input", 0, "u16", ">H", 2296, extra="scale = 0.1", expect=2296 * 0.1)
reg_point("v_i16", "input", 1, "i16", ">h", -1234)
reg_point("v_u32_abcd", "input", 2, "u32", ">I", 4_000_000_000)
reg_point("v_i32_cdab", "input", 4, "i32", ">i", -100_000, order="CDAB")
reg_point("v_f32_abcd", "input", 6, "f32", ">f", 229.6)
reg_point("v_f32_cdab", "input", 8, "f32", ">f", -0.015625, order="CDAB")
reg_point("v_f32_badc", "input", 10, "f32", ">f", 1.5e6, order="BADC")
reg_point("v_f32_dcba", "input", 12, "f32", ">f", 3.14159, order="DCBA")
reg_point("v_f64_abcd", "input", 20, "f64", ">d", 1234.5678)
reg_point("v_f64_dcba", "input", 24, "f64", ">d", -9.87654321e-5, order="DCBA")
reg_point("v_u64_cdab", "input", 28, "u64", ">Q", 123_456_789_012, order="CDAB")
reg_point("v_i64_badc", "input", 32, "i64", ">q", -5_000_000_000, order="BADC")
reg_point("t_scaled", "holding", 0, "i16", ">h", -4, extra="scale = 0.5\noffset = -10.0", expect=-4 * 0.5 - 10.0)
reg_point("status", "holding", 1, "u16", ">H", 0b1000_0000_0000_1000)
POINTS.append(("alarm", "holding", 1, "bool", "ABCD", "bit = 3", None, True))
POINTS.append(("fault", "holding", 1, "bool", "ABCD", "bit = 0\nwritable = true", None, False))
POINTS.append(("top", "holding", 1, "bool", "ABCD", "bit = 15", None, True))
text = b"FG-7\x00junk"
POINTS.append(("model", "holding", 40, "string", "ABCD", "length = 4",
               [int.from_bytes(text[i:i + 2], "big") for i in range(0, 8, 2)], "FG-7"))
POINTS.append(("relay1", "coil", 0, "bool", "ABCD", "writable = true", [True], True))
POINTS.append(("relay2", "coil", 1, "bool", "ABCD", "writable = true", [False], False))
# Setpoints the downlink phase writes (contiguous 60..64 on the slave).
reg_point("sp_f32_cdab", "holding", 60, "f32", ">f", 20.0, order="CDAB", extra="writable = true")
reg_point("sp_scaled", "holding", 62, "i16", ">h", 500, extra="scale = 0.1\noffset = -40.0\nwritable = true",
          expect=500 * 0.1 - 40.0)
reg_point("sp_u32_dcba", "holding", 63, "u32", ">I", 1, order="DCBA", extra="writable = true")
POINTS.append(("door", "discrete", 5, "bool", "ABCD", "", [True], True))

# Pump (unit 2, a sub-device with key).
PUMP = [
    ("level", "holding", 0, "u16", "ABCD", "", [1500], 1500),
    ("flow", "holding", 1, "f32", "CDAB", "", ordered(words(">f", 50.5), "CDAB"), 50.5),
]


def sim_device(unit, points):
    blocks = {"coil": [], "discrete": [], "holding": [], "input": []}
    for name, area, address, ty, order, extra, data, expect in points:
        if data is None:
            continue
        kind = DataType.BITS if area in ("coil", "discrete") else DataType.REGISTERS
        blocks[area].append(SimData(address=address, values=list(data), datatype=kind))
    for area, block in blocks.items():
        if not block:  # pymodbus wants every area defined; far outside our map
            kind = DataType.BITS if area in ("coil", "discrete") else DataType.REGISTERS
            block.append(SimData(address=60000, values=[0], datatype=kind))
    return SimDevice(id=unit, simdata=(blocks["coil"], blocks["discrete"], blocks["holding"], blocks["input"]))


def toml_points(points):
    out = ""
    for name, area, address, ty, order, extra, data, expect in points:
        out += f'\n[[device.point]]\nname = "{name}"\narea = "{area}"\naddress = {address}\ntype = "{ty}"\n'
        if order != "ABCD":
            out += f'order = "{order}"\n'
        if extra:
            out += extra + "\n"
    return out


def close_enough(got, want):
    if isinstance(want, bool) or isinstance(want, str):
        return got == want
    if isinstance(want, int):
        return isinstance(got, int) and not isinstance(got, bool) and got == want
    # f32 values are reported as their shortest decimal form; allow f32 precision.
    return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


def crc16(data):
    """CRC-16/MODBUS, written here from the spec, not taken from fieldgate."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes([crc & 0xFF, crc >> 8])


def frame(*body):
    return bytes(body) + crc16(bytes(body))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Platform:
    """A paho subscriber recording every message."""

    def __init__(self, port, client_id="interop-platform"):
        self.messages = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def wait(self, topic, complete=lambda payload: True, timeout=15.0):
        """The first payload on `topic` for which `complete` holds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                for t, payload, retain in self.messages:
                    if t == topic and complete(payload):
                        return payload
            time.sleep(0.05)
        return None

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()


def run_gateway(config_path, log_path):
    return subprocess.Popen(
        [FIELDGATE, "--config", config_path, "run"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w"), env={**os.environ, "RUST_LOG": "info"},
    )


def stop(gateway):
    """SIGTERM, then kill if it has not exited within 10 s; the exit code
    (None when it had to be killed)."""
    gateway.send_signal(signal.SIGTERM)
    try:
        return gateway.wait(timeout=10)
    except subprocess.TimeoutExpired:
        gateway.kill()
        return None


def main():
    work = tempfile.mkdtemp(prefix="fieldgate-interop-")
    slave_end, gateway_end = f"{work}/slave", f"{work}/gateway"
    mqtt_port = free_port()
    with open(f"{work}/mosquitto.conf", "w") as f:
        f.write(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    children = [
        subprocess.Popen(["socat", f"pty,raw,echo=0,link={slave_end}", f"pty,raw,echo=0,link={gateway_end}"], **quiet),
        subprocess.Popen(["mosquitto", "-c", f"{work}/mosquitto.conf"], **quiet),
    ]
    try:
        for _ in range(100):
            if os.path.exists(gateway_end) and os.path.exists(slave_end):
                break
            time.sleep(0.05)
        # The slave gets its own thread and event loop: the scenarios below
        # block on subprocesses and sleeps.
        async def slave():
            server = ModbusSerialServer([sim_device(1, POINTS), sim_device(2, PUMP)],
                                        framer=FramerType.RTU, port=slave_end, baudrate=19200)
            await server.serve_forever()

        serve = threading.Thread(target=lambda: asyncio.run(slave()), daemon=True)
        serve.start()
        time.sleep(0.5)
        return scenarios(work, gateway_end, mqtt_port)
    finally:
        for p in children:
            p.terminate()
            p.wait()


def scenarios(work, gateway_end, mqtt_port):
    base = f"""
[gateway]
id = "interop-gw"
data_dir = "{work}/data"

[[bus]]
name = "rs485-1"
port = "{gateway_end}"
baud = 19200
timeout = "500ms"

[[device]]
name = "meter"
bus = "rs485-1"
unit = 1
poll = "1s"
{toml_points(POINTS)}
[[device]]
name = "pump"
bus = "rs485-1"
unit = 2
poll = "1s"
key = "pump-001"
{toml_points(PUMP)}"""
    profiles = {
        "thingscloud": f'\n[platform]\nhost = "127.0.0.1"\nport = {mqtt_port}\naccess_token = "t"\nproject_key = "k"\nmax_publish_rate = 0\n',
        "generic": f'\n[platform]\nprofile = "generic"\nhost = "127.0.0.1"\nport = {mqtt_port}\ntopic_prefix = "plant/gw"\n',
    }
    # `fieldgate read` straight against pymodbus.
    with open(f"{work}/read.toml", "w") as f:
        f.write(base)
    out = subprocess.run([FIELDGATE, "--config", f"{work}/read.toml", "read", "pump"],
                         capture_output=True, text=True, timeout=30)
    check("read: exit 0", out.returncode == 0, out.stderr)
    check("read: table shows level 1500 and flow 50.5",
          "1500" in out.stdout and "50.5" in out.stdout, out.stdout)

    for profile, platform_toml in profiles.items():
        config = f"{work}/{profile}.toml"
        with open(config, "w") as f:
            f.write(platform_toml + base)
        platform = Platform(mqtt_port)
        time.sleep(0.3)
        gateway = run_gateway(config, f"{work}/{profile}.log")
        if profile == "thingscloud":
            own_topic, sub_topic = "attributes", "gateway/attributes"
        else:
            own_topic, sub_topic = "plant/gw/meter/attributes", "plant/gw/pump/attributes"
        # The first report lacks the input registers: pymodbus refuses the
        # bridged read, and the gapless reads start with the next poll.
        def complete(payload):
            values = json.loads(payload)
            values = values.get("values", values)
            return {p[0] for p in POINTS} <= set(values)

        own = platform.wait(own_topic, complete)
        sub = platform.wait(sub_topic)
        check(f"{profile}: {own_topic} arrives", own is not None)
        check(f"{profile}: {sub_topic} arrives", sub is not None)
        if own is not None and sub is not None:
            own, sub = json.loads(own), json.loads(sub)
            if profile == "generic":
                now_ms = time.time() * 1000
                check("generic: ts is the sample time in ms",
                      abs(own.get("ts", 0) - now_ms) < 15_000, own.get("ts"))
                own, sub = own.get("values", {}), sub.get("values", {})
            else:
                sub = sub.get("pump-001", {})
            for name, area, address, ty, order, extra, data, want in POINTS:
                check(f"{profile}: {name} = {want!r}", close_enough(own.get(name), want), f"got {own.get(name)!r}")
            check(f"{profile}: no extra attributes", set(own) == {p[0] for p in POINTS}, sorted(own))
            for name, *_, want in PUMP:
                check(f"{profile}: pump {name} = {want!r}", close_enough(sub.get(name), want), f"got {sub.get(name)!r}")
        if profile == "generic":
            # What a subscriber that comes now is told: the retained value.
            late = Platform(mqtt_port, client_id="interop-late")
            status = late.wait("plant/gw/status")
            late.stop()
            check("generic: retained status online", status == b"online", status)
        code = stop(gateway)
        check(f"{profile}: SIGTERM exits 0", code == 0, code)
        if profile == "generic":
            time.sleep(0.5)
            with platform.lock:
                statuses = [p for t, p, r in platform.messages if t == "plant/gw/status"]
            check("generic: offline on shutdown", statuses[-1:] == [b"offline"], statuses)
        with open(f"{work}/{profile}.log") as f:
            log = f.read()
        check(f"{profile}: gapless fallback taken for pymodbus' unmapped gaps", "gapless" in log, log[-2000:])
        platform.stop()
    downlink(work, base, profiles["thingscloud"])
    tcp_reach(work, profiles["thingscloud"])
    local_api(work, base, profiles["thingscloud"])
    device_profiles(work)
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


def downlink(work, base, platform_toml):
    """Writes through mosquitto to pymodbus; what landed in pymodbus' memory
    is read with raw FC03/FC01 frames built here and compared with struct."""
    config = f"{work}/downlink.toml"
    with open(config, "w") as f:
        f.write(platform_toml + base + """
[[command]]
name = "relay_off"
device = "meter"
write = [ { point = "relay1", value = false } ]

[[stream]]
name = "raw"
bus = "rs485-1"
encoding = "hex"
""")
    platform = Platform(int(platform_toml.split("port = ")[1].split()[0]))
    time.sleep(0.3)
    gateway = run_gateway(config, f"{work}/downlink.log")
    first = platform.wait("attributes")
    check("downlink: gateway reporting", first is not None)
    publish = lambda topic, payload: platform.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def raw(request, expect_len):
        """Sends a raw frame; returns the reply frame (CRC checked here)."""
        with platform.lock:
            platform.messages = [m for m in platform.messages if m[0] != "data/raw"]
        publish("data/raw/set", request.hex(" "))
        reply = platform.wait("data/raw")
        reply = bytes.fromhex(reply.decode()) if reply else b""
        check(f"downlink: raw {request[:2].hex()} reply has a valid CRC",
              len(reply) == expect_len and crc16(reply[:-2]) == reply[-2:], reply.hex(" "))
        return reply

    publish("attributes/push", json.dumps(
        {"sp_f32_cdab": 21.75, "sp_scaled": -12.5, "sp_u32_dcba": 3_000_000_000, "fault": True, "relay2": True}))
    back = platform.wait("attributes", lambda p: json.loads(p).get("sp_f32_cdab") == 21.75)
    check("downlink: read-back report", back is not None and json.loads(back) ==
          {"sp_f32_cdab": 21.75, "sp_scaled": -12.5, "sp_u32_dcba": 3_000_000_000, "fault": True, "relay2": True},
          back)
    want = ordered(words(">f", 21.75), "CDAB") + words(">h", round((-12.5 + 40.0) / 0.1)) \
        + ordered(words(">I", 3_000_000_000), "DCBA")
    reply = raw(frame(1, 0x03, 0, 60, 0, 5), 5 + 10)
    got = [int.from_bytes(reply[3 + 2 * i:5 + 2 * i], "big") for i in range(5)] if len(reply) == 15 else None
    check("downlink: registers in pymodbus equal struct's encoding", got == want, f"{got} != {want}")
    reply = raw(frame(1, 0x03, 0, 1, 0, 1), 7)
    check("downlink: bit 0 set by read-modify-write, other bits kept",
          reply[3:5] == (0b1000_0000_0000_1001).to_bytes(2, "big"), reply.hex(" "))
    reply = raw(frame(1, 0x01, 0, 0, 0, 2), 6)
    check("downlink: coils after the push", reply[3:4] == bytes([0b11]), reply.hex(" "))
    publish("command/send/7", json.dumps({"method": "relay_off", "params": {}, "id": 7}))
    answer = platform.wait("command/reply/7")
    check("downlink: command reply", answer is not None and json.loads(answer) ==
          {"method": "relay_off", "params": {"ok": True}}, answer)
    reply = raw(frame(1, 0x01, 0, 0, 0, 2), 6)
    check("downlink: the command cleared relay1", reply[3:4] == bytes([0b10]), reply.hex(" "))
    publish("attributes/push", json.dumps({"sp_scaled": 4000}))  # raw 40400: not an i16
    bad = frame(1, 0x06, 0, 60, 0, 1)
    publish("data/raw/set", (bad[:-1] + bytes([bad[-1] ^ 0xFF])).hex())
    time.sleep(1.0)
    with platform.lock:
        methods = [json.loads(p)["method"] for t, p, r in platform.messages if t.startswith("event/report/")]
    check("downlink: out-of-range push and bad-CRC frame rejected by events",
          methods.count("write_rejected") == 1 and methods.count("frame_rejected") == 1, methods)
    reply = raw(frame(1, 0x03, 0, 60, 0, 5), 5 + 10)
    got = [int.from_bytes(reply[3 + 2 * i:5 + 2 * i], "big") for i in range(5)] if len(reply) == 15 else None
    check("downlink: rejected requests wrote nothing", got == want, f"{got} != {want}")
    stop(gateway)
    platform.stop()


def tcp_reach(work, platform_toml):
    """Modbus TCP (pymodbus, socket framer) and RTU over TCP (pymodbus, RTU
    framer on a TCP socket, as a transparent serial server carries it):
    values, a write and raw frames through mosquitto."""
    tcp_port, rtu_port = free_port(), free_port()

    async def servers():
        plc = ModbusTcpServer([sim_device(1, POINTS)], framer=FramerType.SOCKET, address=("127.0.0.1", tcp_port))
        field = ModbusTcpServer([sim_device(2, PUMP)], framer=FramerType.RTU, address=("127.0.0.1", rtu_port))
        await asyncio.gather(plc.serve_forever(), field.serve_forever())

    threading.Thread(target=lambda: asyncio.run(servers()), daemon=True).start()
    time.sleep(0.5)
    config = f"{work}/tcp.toml"
    with open(config, "w") as f:
        f.write(platform_toml + f"""
[gateway]
id = "interop-tcp"
data_dir = "{work}/tcp-data"

[[bus]]
name = "plc"
transport = "tcp"
address = "127.0.0.1:{tcp_port}"

[[bus]]
name = "field"
transport = "rtu_over_tcp"
address = "127.0.0.1:{rtu_port}"
baud = 9600

[[device]]
name = "meter"
bus = "plc"
unit = 1
poll = "1s"
{toml_points(POINTS)}
[[device]]
name = "pump"
bus = "field"
unit = 2
poll = "1s"
key = "pump-001"
{toml_points(PUMP)}
[[stream]]
name = "plcraw"
bus = "plc"
encoding = "hex"

[[stream]]
name = "fieldraw"
bus = "field"
encoding = "hex"
""")
    out = subprocess.run([FIELDGATE, "--config", config, "check"], capture_output=True, text=True, timeout=30)
    check("tcp: check says a tcp bus has no fixed wire time", "no fixed wire time" in out.stdout, out.stdout)
    check("tcp: check estimates rtu_over_tcp from its baud", "RTU over TCP to" in out.stdout and "of the bus in use" in out.stdout, out.stdout)
    platform = Platform(int(platform_toml.split("port = ")[1].split()[0]))
    time.sleep(0.3)
    gateway = run_gateway(config, f"{work}/tcp.log")

    def complete(payload):
        return {p[0] for p in POINTS} <= set(json.loads(payload))

    own = platform.wait("attributes", complete, timeout=20)
    sub = platform.wait("gateway/attributes", lambda p: "pump-001" in json.loads(p))
    check("tcp: the PLC's report over Modbus TCP arrives", own is not None)
    check("tcp: the pump's report over RTU over TCP arrives", sub is not None)
    if own is not None:
        own = json.loads(own)
        for name, area, address, ty, order, extra, data, want in POINTS:
            check(f"tcp: {name} = {want!r}", close_enough(own.get(name), want), f"got {own.get(name)!r}")
    if sub is not None:
        sub = json.loads(sub)["pump-001"]
        for name, *_, want in PUMP:
            check(f"rtu_over_tcp: pump {name} = {want!r}", close_enough(sub.get(name), want), f"got {sub.get(name)!r}")
    publish = lambda topic, payload: platform.client.publish(topic, payload, qos=1).wait_for_publish(5)
    publish("attributes/push", json.dumps({"sp_f32_cdab": 33.5}))
    back = platform.wait("attributes", lambda p: json.loads(p).get("sp_f32_cdab") == 33.5)
    check("tcp: a write over Modbus TCP is read back", back is not None, back)
    for stream, request, length in [("plcraw", frame(1, 0x03, 0, 60, 0, 2), 9), ("fieldraw", frame(2, 0x03, 0, 0, 0, 1), 7)]:
        publish(f"data/{stream}/set", request.hex(" "))
        reply = platform.wait(f"data/{stream}")
        reply = bytes.fromhex(reply.decode()) if reply else b""
        check(f"{stream}: raw reply in RTU form with a valid CRC",
              len(reply) == length and crc16(reply[:-2]) == reply[-2:], reply.hex(" "))
    want = ordered(words(">f", 33.5), "CDAB")
    publish("data/plcraw/set", frame(1, 0x03, 0, 60, 0, 2).hex(" "))
    time.sleep(1.0)
    with platform.lock:
        replies = [bytes.fromhex(p.decode()) for t, p, r in platform.messages if t == "data/plcraw"]
    got = [int.from_bytes(replies[-1][3 + 2 * i:5 + 2 * i], "big") for i in range(2)] if replies else None
    check("tcp: the written registers in pymodbus equal struct's encoding", got == want, f"{got} != {want}")
    stop(gateway)
    platform.stop()


def local_api(work, base, platform_toml):
    """The local API against pymodbus: `/metrics` through Python's own
    Prometheus parser, trace frames checked here (CRC, registers), the CLI
    reading through the running daemon, and the console in Chromium."""
    api_port = free_port()
    config = f"{work}/api.toml"
    with open(config, "w") as f:
        f.write(platform_toml + base + f'\n[api]\nlisten = "127.0.0.1:{api_port}"\n')
    platform = Platform(mqtt_port_of(platform_toml), client_id="interop-api")
    gateway = run_gateway(config, f"{work}/api.log")
    url = f"http://127.0.0.1:{api_port}"
    try:
        status = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"{url}/api/v1/status", timeout=2) as r:
                    status = json.load(r)
                if all(d["online"] for d in status["devices"]):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        check("api: status answers with both devices online",
              status is not None and [d["online"] for d in status["devices"]] == [True, True], status)
        time.sleep(1.5)
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            text = r.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name, kind in [("fieldgate_modbus_requests", "counter"), ("fieldgate_modbus_request_seconds", "histogram"),
                           ("fieldgate_bus_busy_ratio", "gauge"), ("fieldgate_device_online", "gauge"),
                           ("fieldgate_outbox_messages", "gauge"), ("fieldgate_outbox_bytes", "gauge"),
                           ("fieldgate_outbox_dropped", "counter"), ("fieldgate_mqtt_connected", "gauge"),
                           ("fieldgate_mqtt_published", "counter"), ("fieldgate_uptime_seconds", "gauge")]:
            family = families.get(name)
            check(f"metrics: {name} is a {kind}", family is not None and family.type == kind,
                  family.type if family else sorted(families))
        samples = [s for f in families.values() for s in f.samples]
        ok = sum(s.value for s in samples if s.name == "fieldgate_modbus_requests_total"
                 and s.labels.get("device") == "pump" and s.labels.get("outcome") == "ok")
        check("metrics: pump's ok requests counted", ok > 0, ok)
        online = {s.labels["device"]: s.value for s in samples if s.name == "fieldgate_device_online"}
        check("metrics: both devices online", online == {"meter": 1.0, "pump": 1.0}, online)
        count = [s.value for s in samples if s.name == "fieldgate_modbus_request_seconds_count"
                 and s.labels.get("device") == "pump"]
        inf = [s.value for s in samples if s.name == "fieldgate_modbus_request_seconds_bucket"
               and s.labels.get("device") == "pump" and s.labels.get("le") == "+Inf"]
        check("metrics: the histogram's +Inf bucket equals its count", count and count == inf, (count, inf))
        connected = [s.value for s in samples if s.name == "fieldgate_mqtt_connected"]
        check("metrics: connected to mosquitto", connected == [1.0], connected)

        # The trace: pymodbus' replies to the pump's reads, as on the wire.
        events = []
        with urllib.request.urlopen(f"{url}/api/v1/trace", timeout=10) as r:
            while len(events) < 40:
                line = r.readline().decode().strip()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        pump = [e for e in events if e["unit"] == 2 and e["fc"] == 3 and e["outcome"] == "ok"]
        check("trace: the pump's holding reads are traced", pump, events[:3])
        for e in pump[:1]:
            response = bytes.fromhex(e["response"].replace(" ", ""))
            check("trace: the response has pymodbus' valid CRC",
                  crc16(response[:-2]) == response[-2:], e["response"])
            request = bytes.fromhex(e["request"].replace(" ", ""))
            start, count = struct.unpack(">HH", request[2:6])
            regs = struct.unpack(f">{count}H", response[3:3 + 2 * count])
            want = {0: 1500}
            check("trace: the registers are pymodbus' (level 1500)", start != 0 or regs[0] == want[0], (start, regs))

        out = subprocess.run([FIELDGATE, "--config", config, "read", "pump"],
                             capture_output=True, text=True, timeout=30)
        check("api: `read` through the running daemon shows 1500 and 50.5",
              out.returncode == 0 and "1500" in out.stdout and "50.5" in out.stdout, out.stdout + out.stderr)

        console.check_console(check, f"{url}/", ["meter", "pump"], "level 1500",
                              os.environ.get("FIELDGATE_ARTIFACTS", "target/ci-artifacts"))
    finally:
        stop(gateway)
        platform.stop()


def device_profiles(work):
    """Shipped profiles against pymodbus (Modbus TCP) serving values packed
    here with struct at the addresses of the makers' documents: `read`
    decodes them, and `scan --identify` names the models."""
    port = free_port()

    def block(area, start, values, count):
        regs = [0] * count
        for address, value in values.items():
            regs[address - start:address - start + len(value)] = value
        kind = DataType.REGISTERS
        return SimData(address=start, values=regs, datatype=kind)

    f32 = lambda v: words(">f", v)
    # Eastron SDM630: FC04 floats, 30001 V L1, 30053 total W, 30071 Hz, 30343 total kWh.
    sdm630 = {0x00: f32(230.2), 0x02: f32(231.0), 0x04: f32(229.5), 0x34: f32(4321.5),
              0x46: f32(50.02), 0x156: f32(12400.5)}
    # Peacefair PZEM-016: FC04 u16 0.1 V; current and energy 32 bits low word first.
    pzem = {0x00: [2302], 0x01: ordered(words(">I", 71_234), "CDAB"), 0x05: ordered(words(">I", 123_456), "CDAB"),
            0x07: [500]}
    # CHINT DTSU666: FC03 floats in 0.1 V at 2006H, 0.1 W at 2012H.
    dtsu = {0x2006: f32(2302.0), 0x2012: f32(84210.0)}
    zero = lambda: [SimData(address=60000, values=[0], datatype=DataType.BITS)]
    devices = [
        SimDevice(id=1, simdata=(zero(), zero(), [block("holding", 0, {}, 2)], [block("input", 0, sdm630, 0x160)])),
        SimDevice(id=2, simdata=(zero(), zero(), [block("holding", 0, {}, 4)], [block("input", 0, pzem, 10)])),
        SimDevice(id=3, simdata=(zero(), zero(), [block("holding", 0, {}, 2), block("holding", 0x2000, dtsu, 0x46)],
                                 [SimData(address=60000, values=[0], datatype=DataType.REGISTERS)])),
    ]

    async def server():
        await ModbusTcpServer(devices, framer=FramerType.SOCKET, address=("127.0.0.1", port)).serve_forever()

    threading.Thread(target=lambda: asyncio.run(server()), daemon=True).start()
    time.sleep(0.5)
    config = f"{work}/profiles.toml"
    with open(config, "w") as f:
        f.write(f"""
[gateway]
id = "interop-profiles"
data_dir = "{work}/profiles-data"

[[bus]]
name = "plc"
transport = "tcp"
address = "127.0.0.1:{port}"

[[device]]
name = "main"
bus = "plc"
unit = 1
profile = "eastron-sdm630"
points = ["voltage_l1", "voltage_l3", "power_total", "frequency", "energy_total"]

[[device]]
name = "socket"
bus = "plc"
unit = 2
key = "socket"
profile = "peacefair-pzem016"
points = ["voltage_l1", "current_l1", "energy_total", "frequency"]

[[device]]
name = "board"
bus = "plc"
unit = 3
key = "board"
profile = "chint-dtsu666"
points = ["voltage_l1", "power_total"]
""")
    expected = {
        "main": {"voltage_l1": 230.2, "voltage_l3": 229.5, "power_total": 4321.5, "frequency": 50.02,
                 "energy_total": 12400.5},
        "socket": {"voltage_l1": 230.2, "current_l1": 71.234, "energy_total": 123.456, "frequency": 50.0},
        "board": {"voltage_l1": 230.2, "power_total": 8421.0},
    }
    for device, want in expected.items():
        out = subprocess.run([FIELDGATE, "--config", config, "read", device], capture_output=True, text=True, timeout=30)
        check(f"profiles: read {device} exits 0", out.returncode == 0, out.stdout + out.stderr)
        got = {}
        for line in out.stdout.splitlines()[2:]:
            cells = line.split()  # name, raw words, value, unit (every point here has one)
            if len(cells) >= 4:
                try:
                    got[cells[0]] = float(cells[-2])
                except ValueError:
                    pass
        for point, value in want.items():
            check(f"profiles: {device} {point} = {value}", point in got and close_enough(got[point], value),
                  out.stdout)
    out = subprocess.run([FIELDGATE, "--config", config, "scan", "plc", "--units", "1-3", "--identify"],
                         capture_output=True, text=True, timeout=60)
    lines = {l.split(":")[0]: l for l in out.stdout.splitlines() if l.startswith("unit ")}
    check("profiles: identify names the SDM630", "eastron-sdm630" in lines.get("unit 1", ""), out.stdout)
    check("profiles: identify names the PZEM-016", "peacefair-pzem016" in lines.get("unit 2", ""), out.stdout)
    check("profiles: identify names the DTSU666 alone",
          "chint-dtsu666" in lines.get("unit 3", "") and "eastron" not in lines.get("unit 3", ""), out.stdout)


def mqtt_port_of(platform_toml):
    return int(platform_toml.split("port = ")[1].split()[0])


if __name__ == "__main__":
    sys.exit(main())

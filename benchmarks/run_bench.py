#!/usr/bin/env python3
"""run-bench - measure D-Bus brokers side by side with the dbench load generator.

usage: run-bench [options] TARGET [TARGET ...]

TARGET is one of
  dbus-daemon          start a fresh dbus-daemon (--nofork --print-address) per run
  dbus-broker          start a fresh dbus-broker-launch per run (via ./dbus-broker-wrap)
  p2p                  no broker: dbench talks peer-to-peer to its own server
                       (the client/server ceiling; ping, oneway and large only)
  ADDRESS              an already running bus, e.g. unix:path=/tmp/x/bus
  LABEL=ADDRESS        same, with a label for the table
Use --start LABEL 'COMMAND' to have a broker started fresh per run from a
command line in which {path} / {address} / {dir} are replaced by a socket path,
its unix:path= address and a scratch directory.

The first target is the baseline for the ratio columns.  All targets are run
with the same dbench binary, interleaved (rep 1: A B, rep 2: B A, ...), and each
number is the median over --reps runs.

Examples
  ./run-bench dbus-daemon dbus-broker
  ./run-bench dbus-daemon dbus-broker p2p --md RESULTS.md
  ./run-bench dbus-daemon mybus=unix:path=/run/mybus/socket --pid mybus=1234
  ./run-bench dbus-broker --start sealbus 'python3 -m sealbus --listen {path}'
  ./run-bench --only ping,oneway --scale 0.2 unix:path=/tmp/x/bus
"""
import argparse
import datetime
import json
import os
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DBENCH = os.path.join(HERE, "dbench", "dbench")
WRAP = os.path.join(HERE, "dbus-broker-wrap")
MiB = 1 << 20

# --------------------------------------------------------------- configs

POLICY = """  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
"""

# dbus-daemon: the session.conf values ("essentially infinite").  libdbus
# clamps max_message_size to DBUS_MAXIMUM_MESSAGE_LENGTH (128 MiB).
RAISED_DAEMON = {
    "max_incoming_bytes": 1000000000,
    "max_outgoing_bytes": 1000000000,
    "max_message_size": 1000000000,
    "max_completed_connections": 100000,
    "max_incomplete_connections": 10000,
    "max_connections_per_user": 100000,
    "max_names_per_connection": 50000,
    "max_match_rules_per_connection": 50000,
    "max_replies_per_connection": 50000,
    "auth_timeout": 240000,
}
# dbus-broker-launch reads only these four and turns them into per-UID quotas
# (max-bytes = connections_per_user * outgoing_bytes, etc.).  dbus-broker v33
# stores the quotas in 32-bit ints (bus_init(unsigned int ...)), so the product
# must stay below 2^32: the session.conf values above would give
# 1e14 mod 2^32 = 276 MB, LESS than the 512 MiB default.  These give the
# largest byte quota that fits: 64 * 67108863 = 4294967232.  Every peer is
# charged one fd against the per-UID fd quota (src/bus/peer.c peer_new), so the
# default max-fds 64*64 = 4096 also caps connections per UID at ~4095; 64*1024
# lifts that.  The 128 MiB message size limit is hard-coded
# (src/dbus/message.h MESSAGE_SIZE_MAX).
RAISED_BROKER = {
    "max_connections_per_user": 64,
    "max_outgoing_bytes": 67108863,
    "max_outgoing_unix_fds": 1024,
    "max_match_rules_per_connection": 256,
}


def bus_config(sock_path, limits):
    out = ['<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"',
           ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">',
           "<busconfig>",
           "  <type>session</type>",
           "  <listen>unix:path=%s</listen>" % sock_path,
           "  <auth>EXTERNAL</auth>",
           POLICY.rstrip("\n")]
    for k, v in (limits or {}).items():
        out.append('  <limit name="%s">%d</limit>' % (k, v))
    out.append("</busconfig>\n")
    return "\n".join(out)

# ----------------------------------------------------------- proc helpers


def proc_children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid):
    kids = proc_children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pids):
    tck = os.sysconf("SC_CLK_TCK")
    tot = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                s = f.read()
            fields = s[s.rindex(")") + 2:].split()
            tot += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return tot / tck


def readline_timeout(pipe, timeout):
    """Read one line from a binary pipe within timeout seconds (or None)."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = pipe.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        ch = os.read(fd, 1)
        if not ch:
            break
        if ch == b"\n":
            return buf.decode(errors="replace")
        buf += ch
    return None


def kill_tree(proc, grace=3.0):
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for p in reversed(descendants(proc.pid)):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
    except OSError:
        pass


def run_dbench(args, timeout, pin_cmd=None, stdin=None):
    cmd = (pin_cmd or []) + [DBENCH] + args
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=stdin)
    except subprocess.TimeoutExpired as e:
        return None, "timeout after %ss: %s" % (timeout, (e.stderr or "")[-300:] if isinstance(e.stderr, str) else "")
    res = None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    err = p.stderr.strip()[-400:]
    if res is None:
        return None, "rc=%d %s" % (p.returncode, err)
    res["_rc"] = p.returncode
    if err:
        res["_stderr"] = err
    return res, None

# ------------------------------------------------------------- instances


class Instance:
    """A running bus (or p2p server) a benchmark can talk to."""
    address = None
    p2p = False
    proc = None
    broker_pid = None      # the process that routes messages (RSS, CPU)
    started = False        # True when we own its life cycle

    def tree(self):
        if self.broker_pid is None:
            return []
        return descendants(self.broker_pid)

    def stop(self):
        pass


class DaemonInstance(Instance):
    def __init__(self, wd, limits, pin):
        self.dir = tempfile.mkdtemp(prefix="dd.", dir=wd)
        sock = os.path.join(self.dir, "bus")
        conf = os.path.join(self.dir, "bus.conf")
        with open(conf, "w") as f:
            f.write(bus_config(sock, limits))
        self.log = open(os.path.join(self.dir, "log"), "wb")
        self.proc = subprocess.Popen(pin + ["dbus-daemon", "--config-file=" + conf, "--nofork", "--print-address=1"],
                                     stdout=subprocess.PIPE, stderr=self.log)
        line = readline_timeout(self.proc.stdout, 10)
        if not line:
            self.stop()
            raise RuntimeError("dbus-daemon did not start: " + open(self.log.name).read()[-300:])
        self.address = "unix:path=" + sock
        self.broker_pid = self.proc.pid
        self.started = True
        wait_bus(self.address, 10)

    def stop(self):
        kill_tree(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class BrokerInstance(Instance):
    def __init__(self, wd, limits, pin):
        self.dir = tempfile.mkdtemp(prefix="db.", dir=wd)
        sock = os.path.join(self.dir, "bus")
        conf = os.path.join(self.dir, "bus.conf")
        with open(conf, "w") as f:
            f.write(bus_config(sock, limits))
        self.logpath = os.path.join(self.dir, "log")
        self.proc = subprocess.Popen(pin + [sys.executable, WRAP, sock, self.logpath, "--",
                                            "dbus-broker-launch", "--scope", "user", "--config-file", conf],
                                     stdout=subprocess.DEVNULL, stderr=open(self.logpath + ".stderr", "wb"))
        self.address = "unix:path=" + sock
        self.started = True
        try:
            wait_bus(self.address, 15, self.proc)
        except RuntimeError:
            err = ""
            for p in (self.logpath, self.logpath + ".stderr"):
                if os.path.exists(p):
                    err += open(p, errors="replace").read()[-400:]
            self.stop()
            raise RuntimeError("dbus-broker did not start: " + err)
        # wrapper(python) -> dbus-broker-launch -> dbus-broker
        for p in descendants(self.proc.pid):
            if comm(p) == "dbus-broker":
                self.broker_pid = p
            elif comm(p) == "dbus-broker-lau":
                self.launcher_pid = p
        if self.broker_pid is None:
            self.broker_pid = self.proc.pid

    def tree(self):
        return [self.broker_pid] if self.broker_pid else []

    def stop(self):
        kill_tree(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class P2PInstance(Instance):
    def __init__(self, wd, limits, pin):
        self.dir = tempfile.mkdtemp(prefix="p2p.", dir=wd)
        sock = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen(pin + [DBENCH, "server", "--listen", sock], stdout=subprocess.PIPE)
        line = readline_timeout(self.proc.stdout, 10)
        if not line or not line.startswith("READY"):
            self.stop()
            raise RuntimeError("p2p server did not start")
        self.address = "unix:path=" + sock
        self.p2p = True
        self.started = True
        self.broker_pid = None

    def stop(self):
        kill_tree(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class CommandInstance(Instance):
    def __init__(self, wd, limits, pin, template):
        self.dir = tempfile.mkdtemp(prefix="cmd.", dir=wd)
        sock = os.path.join(self.dir, "bus")
        self.address = "unix:path=" + sock
        cmd = template.format(path=sock, address=self.address, dir=self.dir)
        self.log = open(os.path.join(self.dir, "log"), "wb")
        self.proc = subprocess.Popen(pin + ["sh", "-c", "exec " + cmd], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = True
        try:
            wait_bus(self.address, 30, self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError("command did not bring up a bus: " + open(self.log.name, errors="replace").read()[-400:])
        self.broker_pid = self.proc.pid

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class ExternalInstance(Instance):
    def __init__(self, address, pid):
        self.address = address
        res, err = run_dbench(["probe", "-a", address], 10)
        if res is None:
            raise RuntimeError("cannot connect to %s: %s" % (address, err))
        self.broker_pid = pid or res.get("peer_pid") or None


def wait_bus(address, timeout, proc=None):
    deadline = time.monotonic() + timeout
    err = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("exited with %s" % proc.returncode)
        if os.path.exists(address.split("=", 1)[1].split(",")[0]):
            res, err = run_dbench(["probe", "-a", address, "-t", "5"], 10)
            if res is not None:
                return res
        time.sleep(0.05)
    raise RuntimeError("bus at %s not answering: %s" % (address, err))


class Target:
    def __init__(self, spec, label=None, pid=None, template=None):
        self.spec = spec
        self.template = template
        self.pid = pid
        self.label = label or spec
        if template:
            self.kind = "command"
        elif spec in ("dbus-daemon", "dbus-broker", "p2p"):
            self.kind = spec
        else:
            self.kind = "address"
        self.external = None

    def start(self, wd, limits_name, pin):
        if self.kind == "dbus-daemon":
            return DaemonInstance(wd, RAISED_DAEMON if limits_name == "raised" else {}, pin)
        if self.kind == "dbus-broker":
            return BrokerInstance(wd, RAISED_BROKER if limits_name == "raised" else {}, pin)
        if self.kind == "p2p":
            return P2PInstance(wd, None, pin)
        if self.kind == "command":
            return CommandInstance(wd, None, pin, self.template)
        if self.external is None:
            self.external = ExternalInstance(self.spec, self.pid)
        return self.external

    @property
    def p2p(self):
        return self.kind == "p2p"

# ------------------------------------------------------------ benchmarks


class Bench:
    def __init__(self, bid, title, args, server=True, p2p_ok=True, timeout=300):
        self.id, self.title, self.args = bid, title, args
        self.server, self.p2p_ok, self.timeout = server, p2p_ok, timeout


LARGE_AY = (("1K", 50), ("64K", 30), ("1M", 20), ("16M", 5), ("64M", 3))
LARGE_FD = (("1K", 50), ("64K", 30), ("1M", 20), ("16M", 5), ("64M", 3), ("256M", 3), ("1G", 3))


def size_label(sz):
    return sz[:-1] + " " + sz[-1] + "i"


def size_bytes(sz):
    return int(sz[:-1]) << {"K": 10, "M": 20, "G": 30}[sz[-1]]


def make_benches(scale):
    d = "%.2f" % max(0.2, 4.0 * scale)  # ping seconds: 2 s at make bench's scale 0.5 (1 s runs were too noisy here)
    n = lambda x: str(max(1, int(x * scale)))
    L = []
    L.append(Bench("ping_k1", "Ping(ay16) K=1 sequential", ["ping", "-k", "1", "-d", d, "-s", "16"]))
    L.append(Bench("ping_k4", "Ping(ay16) K=4 sequential", ["ping", "-k", "4", "-d", d, "-s", "16"]))
    L.append(Bench("ping_k1_d16", "Ping(ay16) K=1 pipelined depth 16", ["ping", "-k", "1", "-D", "16", "-d", d, "-s", "16"]))
    L.append(Bench("oneway", "one-way Sink(ay16) NO_REPLY_EXPECTED, %s msgs" % n(200000),
                   ["oneway", "-c", n(200000), "-s", "16"]))
    L.append(Bench("fanout_n10", "broadcast to N=10, burst M=%s" % n(20000),
                   ["fanout", "-N", "10", "-c", n(20000), "-r", "200", "-s", "16"], server=False, p2p_ok=False))
    L.append(Bench("fanout_n100", "broadcast to N=100, burst M=%s" % n(2000),
                   ["fanout", "-N", "100", "-c", n(2000), "-r", "100", "-s", "16"], server=False, p2p_ok=False))
    # Large payloads: `ay` up to the spec's 2^26 array limit, sealed memfd
    # from 1 KiB to 1 GiB (the target there is a flat transit time).
    for sz, cnt in LARGE_AY:
        L.append(Bench("large_ay_" + sz, "ay %sB" % size_label(sz), ["large", "-s", sz, "-c", str(cnt)]))
    for sz, cnt in LARGE_FD:
        L.append(Bench("large_fd_" + sz, "memfd %sB" % size_label(sz), ["large", "--fd", "-s", sz, "-c", str(cnt)]))
    L.append(Bench("idle_1000", "1000 idle connections", ["idle", "-c", "1000"], server=False, p2p_ok=False))
    L.append(Bench("idle_5000", "5000 idle connections", ["idle", "-c", "5000"], server=False, p2p_ok=False))
    return L


def start_server(inst, pin):
    if inst.p2p:
        return None
    p = subprocess.Popen(pin + [DBENCH, "server", "-a", inst.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = readline_timeout(p.stdout, 10)
    if not line or not line.startswith("READY"):
        kill_tree(p)
        raise RuntimeError("dbench server did not get ready: %s" % p.stderr.read().decode(errors="replace")[-300:])
    return p


def run_idle(bench, inst, pin_client):
    time.sleep(0.2)
    pids = inst.tree()
    before = {p: rss_kb(p) for p in pids}
    cmd = pin_client + [DBENCH] + bench.args + ["-a", inst.address]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = None
    deadline = time.monotonic() + bench.timeout
    while time.monotonic() < deadline:
        line = readline_timeout(p.stdout, deadline - time.monotonic())
        if line is None or line.startswith("RESULT "):
            break
    if not line:
        kill_tree(p)
        return None, "idle: no result (%s)" % p.stderr.read().decode(errors="replace")[-300:]
    res = json.loads(line[7:])
    time.sleep(0.5)  # let the broker settle
    pids = inst.tree()
    after = {q: rss_kb(q) for q in pids}
    p.stdin.close()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(p)
    rb = sum(before.get(q, 0) for q in pids)
    ra = sum(after.values())
    res["rss_before_kb"] = rb
    res["rss_after_kb"] = ra
    res["rss_pids"] = {str(q): comm(q) for q in pids}
    res["rss_per_conn_kb"] = (ra - rb) / res["connected"] if res.get("connected") else None
    if getattr(inst, "launcher_pid", None):
        res["launcher_rss_kb"] = rss_kb(inst.launcher_pid)
    return res, res.get("error") or None


def run_one(bench, target, limits_name, wd, pin_broker, pin_client):
    inst = target.start(wd, limits_name, pin_broker)
    server = None
    try:
        if bench.server:
            server = start_server(inst, pin_client)
        pids = inst.tree()
        c0, t0 = cpu_s(pids), time.monotonic()
        if bench.id.startswith("idle"):
            res, err = run_idle(bench, inst, pin_client)
        else:
            args = bench.args + ["-a", inst.address] + (["--p2p"] if inst.p2p else [])
            res, err = run_dbench(args, bench.timeout, pin_client)
        wall = time.monotonic() - t0
        if res is not None:
            res["broker_cpu_s"] = cpu_s(pids) - c0 if pids else None
            res["wall_s"] = wall
        return res, err
    finally:
        if server is not None:
            kill_tree(server)
        if inst.started:
            inst.stop()

# --------------------------------------------------------------- metrics

# (metric key in result, label, unit, higher_is_better, format)
def metric_rows(bid):
    if bid.startswith("ping"):
        return [("calls_per_s", "calls/s", True, "{:,.0f}"),
                ("lat_p50_us", "p50 µs", False, "{:.1f}"),
                ("lat_p99_us", "p99 µs", False, "{:.1f}"),
                ("broker_cpu_us_per_op", "broker CPU µs/call", False, "{:.1f}")]
    if bid == "oneway":
        return [("msgs_per_s", "msgs/s delivered", True, "{:,.0f}"),
                ("broker_cpu_us_per_op", "broker CPU µs/msg", False, "{:.2f}")]
    if bid.startswith("fanout"):
        return [("deliveries_per_s", "deliveries/s", True, "{:,.0f}"),
                ("burst_all_s", "burst: s until all subs have msg M", False, "{:.3f}"),
                ("probe_p50_us", "1 signal -> all subs p50 µs", False, "{:.0f}"),
                ("probe_p99_us", "1 signal -> all subs p99 µs", False, "{:.0f}"),
                ("broker_cpu_us_per_op", "broker CPU µs/delivery", False, "{:.2f}")]
    if bid.startswith("large_ay"):
        return [("transit_med_ms", "transit ms (bytes ready -> receiver has message)", False, "{:.3f}"),
                ("e2e_med_ms", "ms/transfer (call incl. checksum + reply)", False, "{:.2f}"),
                ("e2e_MBps", "MB/s", True, "{:,.0f}")]
    if bid.startswith("large_fd"):
        return [("transit_med_ms", "transit ms (sealed -> receiver has mmap)", False, "{:.3f}"),
                ("e2e_med_ms", "ms/transfer (create+fill+seal+send+mmap+sum)", False, "{:.2f}"),
                ("e2e_MBps", "MB/s", True, "{:,.0f}"),
                ("call_med_ms", "ms send->reply only (after fill+seal)", False, "{:.2f}")]
    if bid.startswith("idle"):
        return [("connect_s", "s to connect all (sequential Hello)", False, "{:.3f}"),
                ("rss_before_kb", "broker RSS before, KiB", False, "{:,.0f}"),
                ("rss_after_kb", "broker RSS with all connected, KiB", False, "{:,.0f}"),
                ("rss_per_conn_kb", "KiB per connection", False, "{:.2f}")]
    return []


def derive(bid, res):
    cpu = res.get("broker_cpu_s")
    ops = None
    if bid.startswith("ping"):
        ops = res.get("calls")
    elif bid == "oneway":
        ops = res.get("delivered")
    elif bid.startswith("fanout"):
        ops = res.get("delivered")
    if cpu is not None and ops:
        res["broker_cpu_us_per_op"] = cpu / ops * 1e6
    return res


def ok_result(bid, res):
    if res is None:
        return False
    if bid.startswith("idle"):
        return res.get("connected") == res.get("requested")
    if bid.startswith("large"):
        return res.get("ok") == res.get("count")
    if bid.startswith("fanout"):
        return not res.get("sub_errors") and not res.get("timed_out") and res.get("delivered") == res.get("expected")
    if bid == "oneway":
        return res.get("delivered") == res.get("sent")
    if bid.startswith("ping"):
        return not res.get("errors") and not res.get("failed_clients")
    return True

# ------------------------------------------------------------ limits probe

LIMIT_CASES = [
    # id, description, dbench args
    ("ay_16M", "ay 16 MiB", ["large", "-s", "16M", "-c", "1"]),
    ("ay_33M", "ay 33 MiB (> dbus-daemon default 32 MiB)", ["large", "-s", "33M", "-c", "1"]),
    ("ay_64M", "ay 64 MiB (= spec max array 2^26)", ["large", "-s", "64M", "-c", "1"]),
    ("ay_64M+1", "ay 64 MiB + 1 byte (> spec max array)", ["large", "-s", str(64 * MiB + 1), "-c", "1"]),
    ("ayay_127M", "2 x ay, 127 MiB total", ["large", "-s", "127M", "--parts", "2", "-c", "1"]),
    ("ayay_128M+", "3 x ay, 129 MiB total (> 128 MiB)", ["large", "-s", "129M", "--parts", "3", "-c", "1"]),
    ("memfd_256M", "sealed memfd 256 MiB", ["large", "--fd", "-s", "256M", "-c", "1"]),
    ("idle_5000", "5000 connections from one uid", ["idle", "-c", "5000", "-H", "0"]),
]


def run_limits(targets, wd, pin_broker, pin_client, log):
    out = []
    for t in targets:
        if t.kind == "p2p":
            continue
        configs = ["stock", "raised"] if t.kind in ("dbus-daemon", "dbus-broker") else ["-"]
        for cfg in configs:
            col = {"target": t.label, "config": cfg, "cases": {}}
            for cid, desc, args in LIMIT_CASES:
                try:
                    inst = t.start(wd, cfg, pin_broker)
                except RuntimeError as e:
                    col["cases"][cid] = {"ok": False, "note": str(e)[:200]}
                    continue
                server = None
                try:
                    if not cid.startswith("idle"):
                        server = start_server(inst, pin_client)
                    res, err = run_dbench(args + ["-a", inst.address, "-t", "60"], 300, pin_client)
                    ok = res is not None and (res.get("ok") == res.get("count") if "ok" in res
                                              else res.get("connected") == res.get("requested"))
                    if res is None:
                        note = err
                    elif "e2e_med_ms" in res:
                        note = ("%.0f ms" % res["e2e_med_ms"]) if ok else res.get("error", "")
                    else:
                        note = "%d/%d connected in %.2fs%s" % (res["connected"], res["requested"], res["connect_s"],
                                                             "" if ok else " (%s)" % res.get("error", ""))
                    col["cases"][cid] = {"ok": ok, "note": note, "raw": res}
                    log("  limits %-12s %-7s %-11s %s %s" % (t.label, cfg, cid, "ok  " if ok else "FAIL", note))
                finally:
                    if server is not None:
                        kill_tree(server)
                    if inst.started:
                        inst.stop()
            out.append(col)
    return out

# ------------------------------------------------------------------ report


def med(vals):
    return statistics.median(vals) if vals else None


def fmt(v, f):
    if v is None:
        return "—"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def render(meta, benches, targets, results, limits):
    L = []
    L.append("Generated by `run-bench` on %s; %s; %s. Load average at start/end: %s / %s." %
             (meta["date"], meta["host"], ", ".join(meta["versions"].values()),
              meta.get("load_start", "?"), meta.get("load_end", "?")))
    L.append("")
    L.append("Targets: " + ", ".join("`%s`" % t.label for t in targets) +
             ". Reps: %d (median shown; [min–max] in brackets). Ratio = median over reps of target / `%s` measured "
             "in the same rep (for rates >1 is better, for times/latency/memory <1 is better). "
             "Pinning: %s. Limits config: %s." %
             (meta["reps"], targets[0].label, meta["pin"], meta["limits"]))
    L.append("")
    base = targets[0].label
    hdr = "| benchmark | metric | " + " | ".join(t.label for t in targets)
    hdr += "".join(" | %s/%s" % (t.label, base) for t in targets[1:]) + " |"
    L.append(hdr)
    L.append("|" + "---|" * (2 + len(targets) + len(targets) - 1))
    for b in benches:
        if not any(results.get((b.id, t.label)) for t in targets):
            continue
        for key, label, _hib, f in metric_rows(b.id):
            row = "| %s | %s |" % (b.title, label)
            meds = {}
            for t in targets:
                runs = results.get((b.id, t.label), [])
                vals = [r[key] for r in runs if r.get("_ok") and r.get(key) is not None]
                nbad = sum(1 for r in runs if not r.get("_ok"))
                if not runs:
                    row += " n/a |"
                    continue
                m = med(vals)
                meds[t.label] = m
                cell = fmt(m, f)
                if len(vals) > 1:
                    cell += " [%s–%s]" % (fmt(min(vals), f), fmt(max(vals), f))
                if nbad:
                    errs = sorted({(r.get("_error") or "failed")[:80] for r in runs if not r.get("_ok")})
                    cell += " (%d/%d failed: %s)" % (nbad, len(runs), "; ".join(errs))
                row += " %s |" % cell
            for t in targets[1:]:
                # median of per-rep paired ratios (both measured back to back
                # in the same rep, so shared machine noise mostly cancels)
                ra = results.get((b.id, t.label), [])
                rb = results.get((b.id, base), [])
                rs = [x[key] / y[key] for x, y in zip(ra, rb)
                      if x.get("_ok") and y.get("_ok") and x.get(key) is not None and y.get(key)]
                row += " %s |" % ("x%.2f" % med(rs) if rs else "—")
            L.append(row)
    if limits:
        L.append("")
        L.append("Size / connection limits (one attempt each, fresh broker per case; `stock` = no <limit> "
                 "elements in the config, `raised` = the limits run-bench uses):")
        L.append("")
        cols = ["%s (%s)" % (c["target"], c["config"]) for c in limits]
        L.append("| case | " + " | ".join(cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for cid, desc, _ in LIMIT_CASES:
            row = "| %s |" % desc
            for c in limits:
                cs = c["cases"].get(cid)
                if cs is None:
                    row += " — |"
                else:
                    row += " %s %s |" % ("ok" if cs["ok"] else "**FAIL**", (cs.get("note") or "").replace("|", "/"))
            L.append(row)
    return "\n".join(L) + "\n"

# -------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help="dbus-daemon | dbus-broker | p2p | [LABEL=]ADDRESS")
    ap.add_argument("--start", nargs=2, action="append", default=[], metavar=("LABEL", "COMMAND"),
                    help="start a broker per run from COMMAND ({path} {address} {dir} substituted)")
    ap.add_argument("--pid", action="append", default=[], metavar="LABEL=PID",
                    help="broker pid for RSS/CPU of an external ADDRESS target (default: SO_PEERCRED pid and its children)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated benchmark id prefixes (ping,oneway,fanout,large,idle); ID$ = exactly ID")
    ap.add_argument("--skip", help="comma-separated benchmark id prefixes to skip")
    ap.add_argument("--only-for", action="append", default=[], metavar="LABEL=PREFIXES",
                    help="run target LABEL only in the benchmarks matching PREFIXES (same syntax as --only)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale message counts and durations (e.g. 0.1 for a slow broker)")
    ap.add_argument("--quick", action="store_true", help="--reps 1 --scale 0.25, no limits probe")
    ap.add_argument("--limits", choices=["raised", "stock"], default="raised",
                    help="config limits for the brokers run-bench starts (default raised)")
    ap.add_argument("--no-limits-probe", action="store_true", help="skip the message size / connection limit probe")
    ap.add_argument("--pin", action="store_true", help="taskset: broker on CPU 0, dbench clients on CPU 1")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--render", metavar="JSON", help="only re-render the table of a saved --json file")
    a = ap.parse_args()

    if a.render:
        d = json.load(open(a.render))
        targets = [Target(t["spec"], t["label"]) for t in d["targets"]]
        results = {(r["bench"], r["target"]): r["runs"] for r in d["results"]}
        benches = make_benches(d["meta"].get("scale", 1.0))
        md = render(d["meta"], benches, targets, results, d["limits"])
        print(md)
        if a.md:
            with open(a.md, "w") as f:
                f.write(md)
        return 0

    if not os.path.exists(DBENCH):
        subprocess.run(["make", "-C", os.path.join(HERE, "dbench")], check=True)
    if a.quick:
        a.reps, a.scale, a.no_limits_probe = 1, 0.25, True

    pids = dict(x.split("=", 1) for x in a.pid)
    targets = []
    for spec in a.targets:
        label = None
        if "=" in spec.split(":", 1)[0]:
            label, spec = spec.split("=", 1)
        elif ":" in spec and spec not in ("dbus-daemon", "dbus-broker", "p2p"):
            label = "bus%d" % (len(targets) + 1) if len(a.targets) > 1 else "bus"
        targets.append(Target(spec, label, int(pids[label]) if label in pids else None))
    for label, cmd in a.start:
        targets.append(Target(label, label, template=cmd))
    if not targets:
        ap.error("no targets")
    if len({t.label for t in targets}) != len(targets):
        ap.error("duplicate target labels")

    benches = make_benches(a.scale)
    def picked(bid, pats):  # "ID$" matches exactly, anything else is a prefix
        return any(bid == p[:-1] if p.endswith("$") else bid.startswith(p) for p in pats.split(","))

    only_for = dict(x.split("=", 1) for x in a.only_for)
    if a.only:
        benches = [b for b in benches if picked(b.id, a.only)]
    if a.skip:
        benches = [b for b in benches if not picked(b.id, a.skip)]

    ncpu = os.cpu_count() or 1
    pin_broker = ["taskset", "-c", "0"] if a.pin else []
    pin_client = ["taskset", "-c", "1" if ncpu > 1 else "0"] if a.pin else []
    wd = tempfile.mkdtemp(prefix="dbench-run.")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "host": "%s, %d CPUs, kernel %s" % (open("/etc/os-release").read().split('PRETTY_NAME="')[1].split('"')[0]
                                            if os.path.exists("/etc/os-release") else "?", ncpu, os.uname().release),
        "reps": a.reps, "scale": a.scale,
        "pin": "broker CPU0, clients CPU1 (taskset)" if a.pin else "none (no taskset)",
        "limits": a.limits,
        "versions": {},
    }
    for exe, arg in (("dbus-daemon", "--version"), ("dbus-broker", "--version")):
        try:
            meta["versions"][exe] = subprocess.run([exe, arg], capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            pass

    meta["load_start"] = open("/proc/loadavg").read().split()[0]
    results = {}
    try:
        for rep in range(a.reps):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for b in benches:
                for t in order:
                    if t.p2p and not b.p2p_ok:
                        continue
                    if t.label in only_for and not picked(b.id, only_for[t.label]):
                        continue
                    try:
                        res, err = run_one(b, t, a.limits, wd, pin_broker, pin_client)
                    except RuntimeError as e:
                        res, err = None, str(e)
                    r = derive(b.id, dict(res or {}))
                    r["_ok"] = ok_result(b.id, res)
                    if err or not r["_ok"]:
                        r["_error"] = (err or (res or {}).get("error") or "incomplete")[:300]
                    results.setdefault((b.id, t.label), []).append(r)
                    keys = [k for k, *_ in metric_rows(b.id)]
                    log("rep %d %-12s %-12s %s %s" % (rep + 1, b.id, t.label, "ok " if r["_ok"] else "ERR",
                                                     " ".join("%s=%s" % (k, fmt(r.get(k), "{:.4g}")) for k in keys) +
                                                     ("  " + r["_error"] if r.get("_error") else "")))
        limits = [] if a.no_limits_probe else run_limits(targets, wd, pin_broker, pin_client, log)
    finally:
        if not a.keep:
            shutil.rmtree(wd, ignore_errors=True)

    meta["load_end"] = open("/proc/loadavg").read().split()[0]
    md = render(meta, benches, targets, results, limits)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta,
                       "targets": [{"label": t.label, "spec": t.spec, "kind": t.kind} for t in targets],
                       "results": [{"bench": k[0], "target": k[1], "runs": v} for k, v in results.items()],
                       "limits": limits}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fleet benchmark in small (bench/bench_fleet.py runs it at 10 to 200 devices with faults; results in
docs/fleet.md): 3 real `edged replay` devices in 2 site network namespaces, one site through an edge
mosquitto bridge and one directly, a 3-node NATS cluster (JetStream R3, MQTT), examples/fleet_consumer.py.
Needs root (ip netns), nats-server and mosquitto; slow (about a minute)."""

from __future__ import annotations

import os
import sys

import pytest

from brokers import program
from conftest import ROOT, missing, shared_path

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_fleet_smoke_zero_loss_and_consumer_counts_match_device_states():
    if os.geteuid() != 0:
        missing("needs root for network namespaces (ip netns)")
    shared_path("data", "mot15", "TUD-Stadtmitte", "det", "det.txt")
    program("nats-server")
    program("mosquitto")
    from fleet.netns import PREFIX, namespaces
    from fleet.run import FleetSpec, run_fleet

    before = {ns for ns in namespaces() if ns.startswith(PREFIX)}
    lines = []
    r = run_fleet(FleetSpec(devices=3, sites=2, fps=4.0, duration_s=30.0), log=lines.append)
    assert r.sent > 0, lines
    assert r.lost == 0 and r.received == r.sent, lines
    assert r.counts_equal, r.count_check
    assert sum(v["devices"] for v in r.count_check.values()) == 3
    assert r.bridged_sites == 1
    assert r.broker_cpu_s > 0 and r.device_private_mb_mean > 0
    # everything the run made is gone
    assert {ns for ns in namespaces() if ns.startswith(PREFIX)} == before


_ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.99.0.1", 7000)); s.listen(4); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hi"); c.close()
"""
_CLIENT = """
import socket, sys
try:
    c = socket.create_connection(("10.99.0.1", 7000), timeout=2); print(c.recv(2).decode())
except OSError as exc:
    print("unreachable", exc)
"""


def test_fleet_topology_link_cut_and_removal_even_on_failure():
    """A site reaches the central namespace through its veth; cutting the link stops that (silently:
    a timeout, no refusal); restoring brings it back; a failure inside the `with` still removes every
    namespace and kills what runs inside."""
    if os.geteuid() != 0:
        missing("needs root for network namespaces (ip netns)")
    import subprocess

    from fleet.netns import Topology, namespaces, pids_in

    topo = Topology("t" + os.urandom(2).hex()[:3], 2)
    server = None
    with pytest.raises(RuntimeError, match="boom"):
        with topo:
            server = subprocess.Popen(topo.exec_argv(topo.central, [sys.executable, "-c", _ECHO_SERVER]),
                                      stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "ready"

            def connect(site: int) -> str:
                return subprocess.run(topo.exec_argv(topo.site_ns(site), [sys.executable, "-c", _CLIENT]),
                                      capture_output=True, text=True, timeout=30).stdout.strip()

            assert connect(0) == "hi" and connect(1) == "hi"
            topo.cut(0)
            assert connect(0).startswith("unreachable") and connect(1) == "hi"
            topo.restore(0)
            assert connect(0) == "hi"
            assert pids_in(topo.central) == [server.pid]
            raise RuntimeError("boom")
    assert not any(ns.startswith(topo.central[:-2]) for ns in namespaces())
    assert server is not None and server.wait(10) is not None  # killed with its namespace

"""Network namespaces for a fleet run: one `central` namespace (the broker cluster) and one per site
(its devices and, for bridged sites, its edge mosquitto), each site joined to the central namespace by a
veth pair of its own. Nothing touches the host's own network: no address, route or port outside these
namespaces, which `destroy()` removes again (killing whatever still runs inside them first).

    central ns: lo carries the node addresses 10.99.0.1..3 (the cluster listens there)
    site k ns:  veth <id>s<k>a 10.98.k.2/24 --- <id>s<k>b 10.98.k.1/24 (in central), route 10.99.0.0/24 via 10.98.k.1

Cutting a site's link = the central end of its veth down: the site end loses its carrier, packets stop
(no FIN, no RST, as with a dead uplink), its routes stay; bringing the end up again restores the path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import List, Sequence

PREFIX = "edfl"  # every namespace and interface name of ours starts with this
NODE_IPS = ("10.99.0.1", "10.99.0.2", "10.99.0.3")
NODE_NET = "10.99.0.0/24"
MAX_SITES = 250


def ip(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def namespaces() -> List[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> List[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def remove_namespace(ns: str, attempts: int = 20) -> None:
    """Kill what still runs in `ns` (processes of this run), then delete it (its veth ends go with it)."""
    for _ in range(attempts):
        pids = pids_in(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for _ in range(attempts):
        if ns not in namespaces() or ip("netns", "del", ns, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"could not remove network namespace {ns}")


class Topology:
    def __init__(self, run_id: str, n_sites: int):
        if not (run_id.isalnum() and len(run_id) == 4):
            raise ValueError("run_id: 4 letters or digits (interface names are limited to 15 characters)")
        if not 1 <= n_sites <= MAX_SITES:
            raise ValueError(f"1..{MAX_SITES} sites")
        self.run_id = run_id
        self.n_sites = n_sites
        self.central = f"{PREFIX}{run_id}-c"
        self.created: List[str] = []

    def site_ns(self, k: int) -> str:
        return f"{PREFIX}{self.run_id}-s{k}"

    def veth(self, k: int, end: str) -> str:
        return f"{PREFIX}{self.run_id}s{k}{end}"

    @staticmethod
    def site_ip(k: int) -> str:
        return f"10.98.{k}.2"

    def create(self) -> "Topology":
        try:
            self._add_ns(self.central)
            for addr in NODE_IPS:
                ip("-n", self.central, "addr", "add", f"{addr}/32", "dev", "lo")
            for k in range(self.n_sites):
                ns, a, b = self.site_ns(k), self.veth(k, "a"), self.veth(k, "b")
                self._add_ns(ns)
                ip("link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", self.central)
                ip("-n", ns, "addr", "add", f"{self.site_ip(k)}/24", "dev", a)
                ip("-n", self.central, "addr", "add", f"10.98.{k}.1/24", "dev", b)
                ip("-n", ns, "link", "set", a, "up")
                ip("-n", self.central, "link", "set", b, "up")
                ip("-n", ns, "route", "add", NODE_NET, "via", f"10.98.{k}.1")
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.created.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def exec_argv(self, ns: str, argv: Sequence[str]) -> List[str]:
        """argv run inside `ns` (ip netns exec replaces itself with the command: same pid)."""
        return ["ip", "netns", "exec", ns, *argv]

    def cut(self, k: int) -> None:
        ip("-n", self.central, "link", "set", self.veth(k, "b"), "down")

    def restore(self, k: int) -> None:
        ip("-n", self.central, "link", "set", self.veth(k, "b"), "up")

    def destroy(self) -> None:
        errors = []
        for ns in reversed(self.created):
            try:
                remove_namespace(ns)
            except Exception as exc:  # keep removing the others
                errors.append(str(exc))
        self.created = []
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> "Topology":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()


def remove_leftovers() -> List[str]:
    """Namespaces of an earlier run that died without cleaning up (ours by their prefix)."""
    gone = [ns for ns in namespaces() if ns.startswith(PREFIX)]
    for ns in gone:
        remove_namespace(ns)
    return gone

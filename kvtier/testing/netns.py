"""Test hosts on one machine: Linux network namespaces joined by a bridge.

Each node gets its own namespace (own loopback, own address on a private
/24); the bridge lives in the root namespace, which also gets an address, so
the test process can reach every node. Needs root and iproute2. Everything is
removed on exit, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SUBNET_PREFIX = "10.231"  # private /24s that only exist inside this sandbox's namespaces


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2 (`{tool}`) is not installed (apt-get install -y iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Cluster:
    tag: str
    nodes: dict[str, str] = field(default_factory=dict)  # name -> address
    namespaces: dict[str, str] = field(default_factory=dict)  # name -> netns name
    bridge: str = ""
    # Each cluster gets its own /24 (from its random tag): two test runs on one
    # machine must not fight over addresses.
    subnet: str = f"{SUBNET_PREFIX}.7"

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.254"

    def launcher(self, node: str) -> list[str]:
        """Prefix that runs a command on ``node``."""
        return ["ip", "netns", "exec", self.namespaces[node]]

    def run(self, node: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.launcher(node), *argv], capture_output=True, text=True)

    def link(self, node: str, up: bool) -> None:
        """Cut or restore ``node``'s network (its cable, as it were)."""
        _ip("netns", "exec", self.namespaces[node], "ip", "link", "set", "eth0",
            "up" if up else "down")

    def sysctl(self, node: str, name: str, value: str) -> None:
        """Set a per-namespace sysctl on ``node`` (e.g. its TCP buffer sizes)."""
        subprocess.run([*self.launcher(node), "sysctl", "-q", "-w", f"{name}={value}"],
                       check=True, capture_output=True, text=True)

    @contextlib.contextmanager
    def slow_uplink(self, node: str, rate: str) -> Iterator[None]:
        """Cap what ``node`` sends (``tc tbf``, e.g. ``rate="4mbit"``) while inside: a
        tier whose reads take seconds. (tbf, not netem: netem is not in every kernel.)"""
        tc = [*self.launcher(node), "tc", "qdisc"]
        subprocess.run([*tc, "add", "dev", "eth0", "root", "tbf", "rate", rate,
                        "burst", "16kb", "latency", "1s"], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run([*tc, "del", "dev", "eth0", "root"], capture_output=True)


@contextlib.contextmanager
def cluster(names: Sequence[str]) -> Iterator[Cluster]:
    tag = uuid.uuid4().hex[:6]
    c = Cluster(tag, bridge=f"kvtbr{tag}", subnet=f"{SUBNET_PREFIX}.{int(tag, 16) % 250 + 1}")
    made_ns: list[str] = []
    made_links: list[str] = []
    try:
        _ip("link", "add", c.bridge, "type", "bridge")
        made_links.append(c.bridge)
        _ip("addr", "add", f"{c.host_address}/24", "dev", c.bridge)
        _ip("link", "set", c.bridge, "up")
        for i, name in enumerate(names, start=1):
            ns, host_end = f"kvt{tag}{i}", f"kvth{tag}{i}"
            _ip("netns", "add", ns)
            made_ns.append(ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            made_links.append(host_end)
            _ip("link", "set", host_end, "master", c.bridge)
            _ip("link", "set", host_end, "up")
            addr = f"{c.subnet}.{i}"
            for cmd in (["ip", "addr", "add", f"{addr}/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
                _ip("netns", "exec", ns, *cmd)
            c.nodes[name], c.namespaces[name] = addr, ns
        yield c
    finally:
        for ns in made_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in reversed(made_links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)

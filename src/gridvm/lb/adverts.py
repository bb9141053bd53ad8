"""VRRP-style adverts: every director says "I am here" on its VIPs' LANs ten times a second.

A VIP's owner is decided by etcd (a lease per VIP election, at least 1 s: etcd's lease
granularity). A dead owner's lease expires 1–1.5 s after its last renewal, so a client's
first retransmitted SYN (1 s after the first) often still goes nowhere and the client sees
its 3 s retransmit or its own timeout. Adverts close that hole the way VRRP does: a standby
that stops hearing a host for `dead` seconds (5 adverts) may depose it, i.e. revoke its
election lease in etcd, so the next candidate is elected at once. etcd stays the one
authority: an advert never makes anyone owner, and a host whose adverts cannot be heard
(multicast filtered) is simply deposed by lease expiry as before.

Adverts are UDP datagrams to an administratively scoped multicast group with TTL 1 (they
never leave the LAN), sent on every interface that carries a VIP subnet, as JSON:
{"gridvm": 1, "cluster": ID, "host": NAME, "seq": N}. One thread sends and receives; it
drains every queued advert before judging silence, so a starved thread never mistakes its
own lateness for a peer's death.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger("gridvm.lb")

GROUP = "239.255.71.8"
PORT = 7118
INTERVAL_S = 0.1
DEAD_S = 0.5


def _mreqn(group: str, ifindex: int) -> bytes:
    """struct ip_mreqn: multicast group, local address (any), interface index."""
    return socket.inet_aton(group) + socket.inet_aton("0.0.0.0") + struct.pack("=i", ifindex)


class Adverts:
    """Send this host's adverts and track when each peer was last heard (one thread)."""

    def __init__(self, host: str, cluster: str, *, on_silent: Callable[[str], None],
                 interval: float = INTERVAL_S, dead: float = DEAD_S, group: str = GROUP,
                 port: int = PORT) -> None:
        self.host, self.cluster = host, cluster
        self.on_silent = on_silent
        self.interval, self.dead = interval, dead
        self.group, self.port = group, port
        self._heard: dict[str, float] = {}      # host -> monotonic time of its last advert
        self._reported: set[str] = set()        # silent hosts already reported
        self._wanted: set[str] = set()          # interfaces to advertise on
        self._joined: dict[str, int] = {}       # interface -> index we joined the group on
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lb-adverts", daemon=True)
        self._sock = self._socket()

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        s.bind(("", self.port))
        s.setblocking(False)
        return s

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._sock.close()

    def interfaces(self, names: set[str]) -> None:
        """Advertise and listen on exactly these interfaces (applied by the thread)."""
        with self._lock:
            self._wanted = set(names)

    def heard(self, host: str) -> float | None:
        """When `host` was last heard (time.monotonic()), or None if never."""
        with self._lock:
            return self._heard.get(host)

    def silent(self, host: str, *, heard_after: float = float("-inf")) -> bool:
        """True if `host` was heard after `heard_after` but not for `dead` seconds since."""
        t = self.heard(host)
        return t is not None and t > heard_after and time.monotonic() - t > self.dead

    def silent_hosts(self, *, heard_within: float) -> set[str]:
        """Hosts silent now whose last advert is less than `heard_within` seconds old."""
        now = time.monotonic()
        with self._lock:
            return {h for h, t in self._heard.items() if self.dead < now - t < heard_within}

    # ----- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        seq, next_send = 0, time.monotonic()
        while not self._stop.is_set():
            self._membership()
            now = time.monotonic()
            if now >= next_send:
                self._send(seq)
                seq += 1
                next_send = max(next_send + self.interval, now)
            with contextlib.suppress(OSError):
                select.select([self._sock], [], [], max(0.0, min(next_send - now,
                                                                 self.interval / 2)))
            self._drain()
            self._judge()

    def _membership(self) -> None:
        with self._lock:
            wanted = set(self._wanted)
        for name in set(self._joined) - wanted:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP,
                                      _mreqn(self.group, self._joined[name]))
            del self._joined[name]
            with self._lock:           # what was heard there can no longer be judged
                self._heard.clear()
                self._reported.clear()
        for name in wanted - set(self._joined):
            try:
                idx = socket.if_nametoindex(name)
                self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                      _mreqn(self.group, idx))
            except OSError as exc:
                log.debug("adverts: cannot listen on %s: %s", name, exc)
                continue
            self._joined[name] = idx

    def _send(self, seq: int) -> None:
        data = json.dumps({"gridvm": 1, "cluster": self.cluster, "host": self.host,
                           "seq": seq}).encode()
        for name, idx in self._joined.items():
            try:
                self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                      _mreqn("0.0.0.0", idx))
                self._sock.sendto(data, (self.group, self.port))
            except OSError as exc:
                log.debug("adverts: cannot send on %s: %s", name, exc)

    def _drain(self) -> None:
        while True:
            try:
                data = self._sock.recv(512)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                msg = json.loads(data)
                host = msg["host"] if msg.get("cluster") == self.cluster else None
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(host, str) and host != self.host:
                with self._lock:
                    self._heard[host] = time.monotonic()
                    self._reported.discard(host)

    def _judge(self) -> None:
        now = time.monotonic()
        with self._lock:
            gone = [h for h, t in self._heard.items()
                    if now - t > self.dead and h not in self._reported]
            self._reported.update(gone)
        for host in gone:
            log.warning("adverts: %s silent for %.1fs", host, self.dead)
            try:
                self.on_silent(host)
            except Exception:
                log.exception("adverts: on_silent(%s) failed", host)

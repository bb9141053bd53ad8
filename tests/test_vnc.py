"""VNC consoles: xm/xl vnc keys honoured on QEMU, an RFB client gets the handshake and a
framebuffer update from an HVM guest (directly and through gridvmd's websocket), the password
is enforced and never on QEMU's command line, and a display in use is refused cleanly."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from hostlab import HostEnv
from rfb import Rfb, RfbError, over_tcp

from gridvm.host import netns

pytestmark = pytest.mark.guest

PASSWORD = "gv-Pass1"


def rfb_tcp(host: HostEnv, port: int, password: str | None) -> tuple[int, int, bytes]:
    def run() -> tuple[int, int, bytes]:
        client, sock = over_tcp("127.0.0.1", port)
        with sock:
            screen = client.handshake(password)
            return screen.width, screen.height, client.framebuffer(screen)
    return netns.call_in(host.ns, run)


def test_hvm_guest_screen_over_vnc_and_websocket(host: HostEnv) -> None:
    cfg, ip = host.write_cfg("vnc1", hvm=True, extra=f"vnc = 1\nvncpasswd = '{PASSWORD}'\n"
                                                     "stdvga = 1")
    host.gridvm("create", str(cfg))
    host.wait_http(ip, timeout=120)
    info = json.loads(host.gridvm("vnc-display", "vnc1", "--json").stdout)
    assert info["host"] == "127.0.0.1" and info["password"] and info["auth"] == "vnc"
    text = host.gridvm("vnc-display", "vnc1").stdout.strip()
    assert text == f"127.0.0.1:{info['port']} (display :{info['display']}) (password)"

    width, height, pixels = rfb_tcp(host, info["port"], PASSWORD)
    assert width >= 640 and height >= 400
    assert len(pixels) == width * height * 4 and len(set(pixels[::4])) > 1, "a blank screen"
    with pytest.raises(RfbError, match="authentication failed"):
        rfb_tcp(host, info["port"], "wrong")

    # the password is set over QMP, never on the command line; VNC listens on loopback only
    pid = json.loads(host.gridvm("list", "vnc1", "--json").stdout)[0]["pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert not any(PASSWORD.encode() in a for a in argv)
    assert b"-vga" in argv and argv[argv.index(b"-vga") + 1] == b"std"
    listening = subprocess.run(["ip", "netns", "exec", host.ns, "ss", "-ltnH"],
                               capture_output=True, text=True, check=True).stdout
    ports = [line.split()[3] for line in listening.splitlines()]
    assert f"127.0.0.1:{info['port']}" in ports and f"0.0.0.0:{info['port']}" not in ports
    assert json.loads(host.gridvm("list", "vnc1", "--json").stdout)[0]["config"]["display"][
        "password"] == "********"

    # gridvmd's websocket (what the web console's noVNC uses) carries the same RFB session
    c = host.agent.client()
    try:
        ws = c.websocket("/v1/domains/vnc1/vnc/stream")
        with ws:
            def recv(_n: int) -> bytes:
                data = ws.recv(timeout=10)
                return data if isinstance(data, bytes) else data.encode()
            client = Rfb(recv, ws.send)
            screen = client.handshake(PASSWORD)
            assert (screen.width, screen.height) == (width, height)
            assert len(client.framebuffer(screen)) == width * height * 4
    finally:
        c.close()
    host.gridvm("destroy", "vnc1")
    host.assert_clean()


def test_vnc_display_in_use_is_refused_and_vncunused_finds_another(host: HostEnv) -> None:
    def occupy() -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 5900 + 37))
        s.listen()
        return s

    taken = netns.call_in(host.ns, occupy)
    try:
        cfg, _ = host.write_cfg("vnc2", extra="vfb = [ 'vnc=1, vncdisplay=37' ]")
        proc = host.gridvm("create", str(cfg), check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip() == ("gridvm: error: domain vnc2: VNC display :37 (port 5937 "
                                       "on 127.0.0.1) is already in use; pick another "
                                       "vncdisplay or set vncunused = 1")
        assert [d for d in host.domains() if d["name"] == "vnc2"] == []
        host.assert_clean()

        cfg, ip = host.write_cfg("vnc3", extra="vnc = 1\nvncdisplay = 37\nvncunused = 1")
        host.gridvm("create", str(cfg))
        info = json.loads(host.gridvm("vnc-display", "vnc3", "--json").stdout)
        assert info["display"] == 38 and not info["password"] and info["auth"] == "none"
        host.gridvm("destroy", "vnc3")
    finally:
        taken.close()
    no_vnc, _ = host.write_cfg("vnc4")
    host.gridvm("create", str(no_vnc))
    proc = host.gridvm("vnc-display", "vnc4", check=False)
    assert proc.returncode == 1 and "has no VNC display" in proc.stderr
    host.gridvm("destroy", "vnc4")
    host.assert_clean()

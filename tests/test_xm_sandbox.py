"""Xen's own example files run unchanged: `import os, re` answered by a stand-in, every
example of Xen's xl-disk-configuration document, and display/device-model keys that warn."""

from __future__ import annotations

import os
import time

import pytest

from gridvm.config.safeeval import evaluate
from gridvm.config.xmfile import parse_config
from gridvm.config.xmvalues import parse_disk
from gridvm.errors import ConfigError

XM_HEADER = """\
import os, re
arch = os.uname()[4]
if os.uname()[0] == 'Linux' and re.search('64', arch):
    arch_libdir = 'lib64'
else:
    arch_libdir = 'lib'
"""


def test_xmexample_hvm_header_is_answered_not_executed() -> None:
    text = XM_HEADER + """\
kernel = "/usr/lib/xen/boot/hvmloader"
builder = 'hvm'
memory = 128
name = "ExampleHVMDomain"
vif = [ 'type=ioemu, bridge=xenbr0' ]
disk = [ 'file:/var/images/min-el3-i386.img,hda,w', ',hdc:cdrom,r' ]
device_model = '/usr/' + arch_libdir + '/xen/bin/qemu-dm'
sdl = 0
vnc = 1
serial = 'pty'
"""
    result = parse_config(text, "xmexample.hvm")
    assert result.config.type == "hvm" and result.config.kernel is None
    assert [d.vdev for d in result.config.disks] == ["hda"]
    assert result.warnings == [
        "xmexample.hvm:12: empty CD-ROM drive hdc left out (no media)",
        "xmexample.hvm:13: device_model ignored: gridvm runs and configures QEMU itself",
    ], "sdl = 0 asks for nothing, so it is not reported"
    assert result.config.display.vnc
    values = evaluate(XM_HEADER).values
    assert values["arch"] == os.uname().machine
    assert values["arch_libdir"] == ("lib64" if "64" in os.uname().machine else "lib")


def test_os_and_re_stand_ins() -> None:
    values = evaluate("""\
import os
import re as regex
u = os.uname()
m = regex.match(r'(\\w+)-(\\d+)', 'web-42')
first, number = m.groups()
whole = m.group()
where = m.span(2)
nothing = regex.search('^x', 'abc')
loud = regex.search('ABC', 'xabc', regex.I).start()
""").values
    assert values["u"] == tuple(os.uname())
    assert (values["first"], values["number"], values["whole"]) == ("web", "42", "web-42")
    assert values["where"] == (4, 6) and values["nothing"] is None and values["loud"] == 1


@pytest.mark.parametrize(("code", "message"), [
    ("import os\nx = os.system('id')", "attribute access 'os.system' is not allowed"),
    ("import os\nx = os.path.exists('/')", "attribute access 'os.path.exists' is not allowed"),
    ("import os\nx = os.environ", "attribute access 'os.environ' is not allowed"),
    ("import re\nx = re.compile('a')", "attribute access 're.compile' is not allowed"),
    ("import re\nx = re.sub('a', 'b', 'c')", "attribute access 're.sub' is not allowed"),
    ("import re\nx = re.search('(a+)+$', 'aaaa')", "nested repetition is not allowed"),
    ("import re\nx = re.search('(a|aa)*$', 'aaaa')", "nested repetition"),
    ("import re\nx = re.search(r'(a)\\1', 'aa')", "backreferences are not allowed"),
    ("import re\nx = re.search('a*b*c*d*', 'x')", "more than 3 repetitions"),
    ("import re\nx = re.search('a', 'b' * 300)", "string longer than 256"),
    ("import re\nx = re.search('(', 'b')", "bad pattern"),
    ("import re\nx = re.search('a', 'b', 8)", "only re.I"),
    ("import re\nx = re.match('a', 'a').string", "attribute access 're.match('a', 'a').string'"),
    ("import os\nx = os.uname().sysname", "attribute access"),
    ("import sys", "'import sys' is not allowed"),
    ("import subprocess, os", "'import subprocess' is not allowed"),
    ("from os import uname", "'import' is not allowed here"),
    ("def f():\n    import os\nx = f()", "'import' is not allowed here"),
])
def test_anything_else_is_refused_with_file_and_line(code: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^t\.cfg:\d+: .*" + message.replace("(", r"\(")
                       .replace(")", r"\)").replace("*", r"\*").replace("+", r"\+")
                       .replace("|", r"\|").replace("$", r"\$").replace(".", r"\.")):
        parse_config("name = 'x'\n" + code + "\n", "t.cfg")


def test_allowed_patterns_cannot_take_long() -> None:
    started = time.monotonic()
    evaluate("import re\nx = re.search('a*a*a*c', '" + "a" * 256 + "')")
    assert time.monotonic() - started < 2


# ----- Xen's docs/misc/xl-disk-configuration: every example --------------------------------

EQUIVALENT_DISKS = [
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "raw:/dev/vg/guest-volume,hda,w",
]
EQUIVALENT_CDROMS = [
    "/root/image.iso,,hdc,cdrom",
    "/root/image.iso,,hdc,,cdrom",
    "/root/image.iso,raw,hdc,devtype=cdrom",
    "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
    "raw:/root/image.iso,hdc:cdrom,ro",
]


@pytest.mark.parametrize("group", [EQUIVALENT_DISKS, EQUIVALENT_CDROMS],
                         ids=["disk", "cdrom"])
def test_xl_disk_configuration_examples(group: list[str]) -> None:
    parsed = [parse_disk(spec) for spec in group]
    assert all(p is not None and p == parsed[0] for p in parsed), parsed
    first = parsed[0]
    assert first is not None
    if group is EQUIVALENT_DISKS:
        assert (first.target, first.vdev, first.mode, first.devtype) == (
            "/dev/vg/guest-volume", "hda", "w", "disk")
    else:
        assert (first.target, first.vdev, first.mode, first.devtype) == (
            "/root/image.iso", "hdc", "r", "cdrom")


def test_xl_disk_configuration_in_a_config_and_the_deprecated_forms() -> None:
    cfg = parse_config("name = 'd'\ntype = 'hvm'\n"
                       "disk = [ '/dev/vg/guest-volume,,hda', '/root/image.iso,,hdc,cdrom' ]\n",
                       "d.xl").config
    assert [(d.vdev, d.devtype) for d in cfg.disks] == [("hda", "disk"), ("hdc", "cdrom")]
    notes: list[str] = []
    assert parse_disk(",hdc:cdrom,r", notes) is None and notes  # xend's empty CD-ROM
    for prefixed in ("tap:aio:/some/path,xvda,w", "tapdisk:aio:/some/path,xvda,w",
                     "tap2:/some/path,xvda,w", "ioemu:/some/path,xvda,w",
                     "file:/some/path,xvda,w", "phy:/some/path,xvda,w"):
        disk = parse_disk(prefixed)
        assert disk is not None and disk.target == "/some/path", prefixed

"""The xm/xl config reader: safe evaluator, normalization to DomainConfig, MAC generation."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest

from gridvm.config.macs import XEN_OUI, assign_macs, generate_mac
from gridvm.config.model import DisplayParams, DomainConfig, VifSpec
from gridvm.config.safeeval import Limits, evaluate
from gridvm.config.xmfile import (
    IGNORED_KEYS,
    UNSUPPORTED_KEYS,
    LoadResult,
    load_config,
    parse_config,
)
from gridvm.config.xmvalues import parse_bytes, parse_disk, parse_vif
from gridvm.errors import ConfigError, Conflict

CONFIGS = Path(__file__).parent / "configs"


def parse(text: str, variables: dict[str, str] | None = None, **kw: Any) -> LoadResult:
    return parse_config(text, "t.cfg", variables, **kw)


def cfg(text: str, variables: dict[str, str] | None = None, **kw: Any) -> DomainConfig:
    return parse(text, variables, **kw).config


def dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def raises_at(line: int | None, pattern: str) -> Any:
    where = f"t.cfg:{line}: " if line is not None else "t.cfg: "
    return pytest.raises(ConfigError, match=re.escape(where) + pattern)


# ----- the example configs ------------------------------------------------------------------

EXAMPLES = [
    ("xmexample1", None, "xm", {
        "name": "ExampleDomain",
        "uuid": "06ed00fe-1162-4fc4-b5d8-11993ee4a8b9",
        "type": "pv",
        "memory": 64,
        "vcpus": 1,
        "cpus": "0,2-3,5",
        "kernel": "/boot/vmlinuz-2.6-xenU",
        "ramdisk": None,
        "root": "/dev/hda1 ro",
        "extra": "4",
        "disks.0.target": "/dev/hda1",
        "disks.0.vdev": "hda1",
        "disks.0.mode": "w",
        "vifs": [VifSpec()],
        "actions.on_poweroff": "destroy",
        "actions.on_reboot": "restart",
        "actions.on_crash": "coredump-restart",
    }),
    ("xmexample2", {"vmid": "3"}, "xm", {
        "name": "VM3",
        "memory": 128,
        "cpus": "3",
        "disks.0.target": "/dev/sda10",
        "disks.0.vdev": "sda1",
        "disks.1.target": "/dev/sda6",
        "disks.1.mode": "r",
        "vifs.0.mac": "00:16:3e:00:00:03",
        "vifs.0.bridge": "xenbr0",
        "net.ip": "192.0.2.13",
        "net.netmask": "255.255.255.0",
        "net.gateway": "192.0.2.1",
        "net.hostname": "vm3",
        "extra": "4 VMID=3 usr=/dev/sda6",
        "sched.weight": 512,
        "actions.on_crash": "restart",
    }),
    ("xmexample.hvm", None, "xm", {
        "name": "ExampleHVMDomain",
        "type": "hvm",
        "kernel": None,  # hvmloader is Xen's HVM firmware, not a kernel
        "memory": 128,
        "disks.0.target": "/var/images/min-el3-i386.img",
        "disks.0.vdev": "hda",
        "disks.0.devtype": "disk",
        "disks.1.target": "/var/images/install.iso",
        "disks.1.vdev": "hdc",
        "disks.1.devtype": "cdrom",
        "disks.1.mode": "r",
        "vifs": [VifSpec(bridge="xenbr0", model="e1000")],
        "boot": "cda",
        "serial": "pty",
        "actions.on_crash": "restart",
    }),
    ("xlexample.pvlinux", None, "xl", {
        "name": "example.pvlinux",
        "type": "pv",
        "memory": 128,
        "maxmem": 512,
        "vcpus": 2,
        "kernel": "/boot/vmlinuz",
        "ramdisk": "/boot/initrd.gz",
        "extra": "root=/dev/xvda1",
        "disks.0.target": "/dev/vg/guest-volume",
        "disks.0.format": "raw",
        "disks.0.vdev": "xvda",
        "disks.0.mode": "w",
        "vifs": [VifSpec()],
        "actions.on_crash": "destroy",
    }),
    ("web.cfg", None, "xl", {
        "name": "web1",
        "uuid": "3f0c7c1e-6b7e-4d55-9d8a-0d6c2c1d7a10",
        "type": "pv",
        "memory": 512,
        "maxmem": 1024,
        "vcpus": 2,
        "cpus": "2,4-5",
        "cmdline": "root=/dev/xvda ro console=hvc0",
        "disks.0.target": "/srv/gridvm/images/web1.img",
        "disks.1.format": "qcow2",
        "disks.1.iops": 500,
        "disks.1.bps": 10 * 1024 * 1024,
        "disks.2.target": "/srv/gridvm/iso/tools,v2.iso",
        "disks.2.devtype": "cdrom",
        "disks.2.mode": "r",
        "vifs.0.mac": "00:16:3e:12:34:56",
        "vifs.0.ip": "192.0.2.21",
        "vifs.0.rate": "10Mb/s",
        "vifs.0.vifname": "web1.0",
        "vifs.1": VifSpec(bridge="xenbr1", model="virtio"),
        "sched.weight": 512,
        "sched.cap": 150,
        "serial": "pty",
        "ha.ha": "restart",
        "ha.ha_priority": 10,
        "ha.ha_group": "web",
        "ha.hosts": ["node1", "node2"],
        "actions.on_crash": "destroy",
        "display.vnc": True,
        "display.listen": "0.0.0.0",
    }),
    ("hvm.xl", None, "xl", {
        "name": "example.hvm",
        "type": "hvm",
        "memory": 1024,
        "disks.0.target": "/dev/vg0/example-hvm",
        "disks.0.vdev": "hda",
        "disks.1.target": "/srv/iso/debian-12.iso",
        "disks.1.devtype": "cdrom",
        "disks.1.vdev": "hdc",
        "vifs": [VifSpec(bridge="xenbr0", model="e1000")],
        "boot": "dc",
        "actions.on_crash": "destroy",
        "display": DisplayParams(vnc=True, display=3, unused=False, vga="std"),
    }),
]


@pytest.mark.parametrize(("filename", "variables", "fmt", "expected"), EXAMPLES,
                         ids=[e[0] for e in EXAMPLES])
def test_example_configs(filename: str, variables: dict[str, str] | None, fmt: str,
                         expected: dict[str, Any]) -> None:
    result = load_config(CONFIGS / filename, variables)
    config = result.config
    assert config.source_format == fmt
    assert config.source_file == str(CONFIGS / filename)
    for path, value in expected.items():
        assert dig(config, path) == value, path


def test_example_warnings() -> None:
    display = "there is no local display: use vnc = 1"
    ex1 = CONFIGS / "xmexample1"
    assert load_config(ex1).warnings == []
    assert load_config(ex1).config.display == DisplayParams(vnc=True, unused=True)
    ex2 = CONFIGS / "xmexample2"
    assert load_config(ex2, {"vmid": "1"}).warnings == []
    hvm = CONFIGS / "xmexample.hvm"
    assert load_config(hvm).warnings == [
        f"{hvm}:104: device_model ignored: gridvm runs and configures QEMU itself",
        f"{hvm}:122: opengl ignored: {display}",
    ]
    assert load_config(hvm).config.display == DisplayParams(vnc=True, vga="cirrus")
    web = load_config(CONFIGS / "web.cfg").warnings
    assert [w for w in web if "on_watchdog" in w] == [
        f"{CONFIGS / 'web.cfg'}:32: on_watchdog ignored: this action is not supported"
    ]
    xl = CONFIGS / "hvm.xl"
    assert load_config(xl).warnings == [
        f"{xl}:21: empty CD-ROM drive hdd left out (no media)",
    ]


def test_example_hvm_disk_count() -> None:
    assert len(load_config(CONFIGS / "hvm.xl").config.disks) == 2


def test_pv_cmdline_from_xm_keys() -> None:
    config = load_config(CONFIGS / "xmexample2", {"vmid": "3"}).config
    assert config.kernel_cmdline() == (
        "root=/dev/sda1 ro ip=192.0.2.13::192.0.2.1:255.255.255.0:vm3:eth0:off "
        "4 VMID=3 usr=/dev/sda6"
    )


# ----- computed configs and xm_vars -------------------------------------------------------


@pytest.mark.parametrize(("vmid", "memory", "weight", "extra"), [
    ("1", 64, 128, "4 VMID=1 usr=/dev/sda6 quiet"),
    ("2", 64, 128, "4 VMID=2 usr=/dev/sda6 quiet"),
    ("3", 128, 512, "4 VMID=3 usr=/dev/sda6"),
    (" 12 ", 128, 512, "4 VMID=12 usr=/dev/sda6"),
])
def test_computed_config_follows_vmid(vmid: str, memory: int, weight: int, extra: str) -> None:
    config = load_config(CONFIGS / "xmexample2", {"vmid": vmid}).config
    n = int(vmid)
    assert config.name == f"VM{n}"
    assert config.net.ip == f"192.0.2.{10 + n}"
    assert config.vifs[0].mac == f"00:16:3e:00:00:{n:02x}"
    assert config.disks[0].target == f"/dev/sda{7 + n}"
    assert (config.memory, config.sched.weight, config.extra) == (memory, weight, extra)


@pytest.mark.parametrize(("variables", "message"), [
    ({"vmid": "0"}, "invalid value for variable vmid: '0'"),
    ({"vmid": "-4"}, "invalid value for variable vmid: '-4'"),
    ({"vmid": "three"}, "invalid value for variable vmid: 'three': int(): invalid literal"),
    ({}, "variable 'vmid' is not set: give it as vmid=VALUE "
         "(Virtual machine id. Integer greater than 0.)"),
])
def test_check_function_rejects(variables: dict[str, str], message: str) -> None:
    path = CONFIGS / "xmexample2"
    with pytest.raises(ConfigError) as info:
        load_config(path, variables)
    assert str(info.value).startswith(f"{path}:35: {message}")
    assert info.value.line == 35
    assert info.value.file == str(path)


CHECKED = """\
def vmid_check(var, val):
    if val is None:
        return 7
    v = int(val)
    if v > 100:
        raise ValueError("%s must be at most 100" % var)
    return v
xm_vars.var('vmid', use='id', check=vmid_check)
xm_vars.check()
name = "vm%d" % vmid
"""


def test_check_function_may_supply_a_default() -> None:
    assert cfg(CHECKED).name == "vm7"
    assert cfg(CHECKED, {"vmid": "42"}).name == "vm42"


def test_check_function_message_is_shown() -> None:
    with raises_at(9, "invalid value for variable vmid: '101': vmid must be at most 100"):
        cfg(CHECKED, {"vmid": "101"})


def test_variables_are_strings_without_check() -> None:
    assert cfg("name = 'web' + vmid\nmemory = int(mem) * 2\n", {"vmid": "7", "mem": "256"}) \
        .model_dump(include={"name", "memory"}) == {"name": "web7", "memory": 512}


@pytest.mark.parametrize(("text", "line", "message"), [
    ("name = 'vm%s' % vmid\n", 1,
     "name 'vmid' is not defined (if it is a variable, give it as vmid=VALUE)"),
    ("xm_vars.var('vmid', 'the id')\nname = 'vm' + vmid\n", 2,
     "variable 'vmid' is not set: give it as vmid=VALUE (the id)"),
])
def test_missing_variable(text: str, line: int, message: str) -> None:
    with raises_at(line, re.escape(message)):
        cfg(text)


def test_env_get_reads_optional_variables() -> None:
    text = "n = xm_vars.env.get('vmid', '1')\nname = 'vm' + n\n"
    assert cfg(text).name == "vm1"
    assert cfg(text, {"vmid": "5"}).name == "vm5"


def test_unused_variable_is_reported() -> None:
    result = parse("name = 'web'\n", {"vmdi": "3"})
    assert result.warnings == ["t.cfg: variable 'vmdi' was given but the config does not use it"]


@pytest.mark.parametrize("name", ["1x", "__class__", "xm_vars", "a-b", "_private", "def"])
def test_invalid_variable_names(name: str) -> None:
    with raises_at(None, "invalid variable name"):
        cfg("name = 'web'\n", {name: "1"})


# ----- the evaluator -----------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "value"), [
    ("'vm%02d' % 3", "vm03"),
    ("'%(a)s-%(b)d' % {'a': 'x', 'b': 2}", "x-2"),
    ("'%s:%s' % ('a', 1)", "a:1"),
    ("7 // 2 + 7 % 2 - 1 * 3", 1),
    ("7 / 2", 3.5),
    ("2 ** 10", 1024),
    ("-(3) + +4", 1),
    ("[1, 2] + [3]", [1, 2, 3]),
    ("(1, 'a')", (1, "a")),
    ("{'k': [1]}['k'][0]", 1),
    ("'abcdef'[1:4]", "bcd"),
    ("[1, 2, 3][-1]", 3),
    ("'x' if 1 < 2 <= 2 else 'y'", "x"),
    ("1 < 2 > 3", False),
    ("0 or '' or 'z'", "z"),
    ("1 and 0", 0),
    ("not []", True),
    ("'a' in 'cat' and 3 not in [1, 2]", True),
    ("None is None", True),
    ("int('12') + len('abc') + max(1, 5) + min([4, 2]) + abs(-1)", 23),
    ("str(5) + str(1.5)", "51.5"),
    ("float('2.5') * 2", 5.0),
    ("bool(0)", False),
    ("list('ab')", ["a", "b"]),
    ("range(3)", [0, 1, 2]),
    ("['sd%s' % c for c in 'abc' if c != 'b']", ["sda", "sdc"]),
    ("[i * j for i in range(1, 3) for j in range(2)]", [0, 1, 0, 2]),
    ("f'vm{3:03d}-{\"x\"!r}'", "vm003-'x'"),
    ("'a' * 3", "aaa"),
])
def test_expressions(expr: str, value: object) -> None:
    assert evaluate(f"x = {expr}\n").values["x"] == value


def test_statements() -> None:
    text = """\
'''A docstring.'''
def pick(n, base=10):
    '''Docstring inside.'''
    if n > 5:
        return base + n
    elif n > 2:
        pass
    return base
a = b = 1
c, d = 'cd'
e = 1
e += 2
e *= 3
if a == 2:
    f = 'two'
elif a == 1:
    f = 'one'
else:
    f = 'other'
g = pick(7)
h = pick(3, base=0)
i = pick(n=1)
"""
    values = evaluate(text).values
    assert [values[k] for k in "abcdefghi"] == [1, 1, "c", "d", 9, "one", 17, 0, 10]


REJECTED = [
    ("import sys", "'import sys' is not allowed"),
    ("import os.path", "'import os.path' is not allowed"),
    ("from os import system", "'import' is not allowed"),
    ("x = os.system('ls')", re.escape("attribute access 'os.system' is not allowed")),
    ("x = 'a'.upper()", re.escape("attribute access ''a'.upper' is not allowed")),
    ("x = ().__class__", "attribute access"),
    ("x = xm_vars.vars", re.escape("attribute access 'xm_vars.vars' is not allowed")),
    ("x = __import__('os')", "name '__import__' is not allowed"),
    ("x = __builtins__", "name '__builtins__' is not allowed"),
    ("__name__ = 1", "name '__name__' is not allowed"),
    ("x = open('/etc/passwd')", "call to 'open' is not allowed"),
    ("x = exec('1')", "call to 'exec' is not allowed"),
    ("x = eval('1')", "call to 'eval' is not allowed"),
    ("x = getattr(1, 'real')", "call to 'getattr' is not allowed"),
    ("x = frobnicate(1)", "call to 'frobnicate' is not allowed"),
    ("x = lambda: 1", "lambda expressions are not allowed"),
    ("x = (i for i in [1])", "generator expressions are not allowed"),
    ("x = {i: 1 for i in [1]}", "dict comprehensions are not allowed"),
    ("x = {1, 2}", "set literals are not allowed"),
    ("x = [y := 1]", "':=' assignments are not allowed"),
    ("x = [*range(3)]", re.escape("starred ('*') expressions are not allowed")),
    ("x = b'bytes'", "bytes literals are not allowed"),
    ("for i in range(3): pass", "'for' loops are not allowed"),
    ("while True: pass", "'while' loops are not allowed"),
    ("with f: pass", "'with' statements are not allowed"),
    ("try:\n  pass\nexcept: pass", "'try' statements are not allowed"),
    ("class A: pass", "classes are not allowed"),
    ("del name", "'del' statements are not allowed"),
    ("global x", "'global' statements are not allowed"),
    ("assert 1", "'assert' statements are not allowed"),
    ("x[0] = 1", "only plain names can be assigned"),
    ("x: int = 1", "AnnAssign"),
    ("1 + 2", "only calls are allowed"),
    ("return 1", "'return' outside a function"),
    ("raise SystemExit", re.escape("only 'raise ValueError(...)' is allowed")),
    ("@dec\ndef f(): pass", "decorators are not allowed"),
    ("def f(*a): pass", "functions may take only plain parameters"),
    ("x = 'a' * 10**10", "value too large"),
    ("x = [0] * 10**7", "value too large"),
    ("x = 10 ** 10 ** 10", "number too large"),
    ("x = 2 ** 5000", "number too large"),
    ("x = '%999999999d' % 1", "format width too large"),
    ("x = '%*d' % (5, 1)", r"'\*' widths are not allowed"),
    ("x = f'{1:999999999}'", "format width too large"),
    ("x = range(10**8)", "range too large"),
    ("x = [[c] * 1000 for c in range(2000)]", "(value too large|config takes too long)"),
    ("x = " + "[" * 70 + "]" * 70, "value nested too deeply"),
    ("x = [1 for i in range(10**5) if len('a' * 400000)]", "config takes too long"),
    ("a = [0] * 500000; x = [a == a[:] for i in range(10**5)]", "config takes too long"),
    ("a = 'a' * 500000; x = [len(str(a)) for i in range(10**5)]", "config takes too long"),
]


@pytest.mark.parametrize(("statement", "message"), REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_constructs_name_their_line(statement: str, message: str) -> None:
    text = "name = 'web'\n# a comment\n" + statement + "\n"
    with pytest.raises(ConfigError, match=r"^t\.cfg:3: .*" + message) as info:
        parse(text)
    assert info.value.line == 3


def test_rejection_inside_a_function_names_that_line() -> None:
    text = "def f(v):\n    return open(v)\nx = f('/etc/passwd')\n"
    with raises_at(2, "call to 'open' is not allowed"):
        parse(text)


def test_nothing_runs_at_definition_time() -> None:
    # Functions are checked when called, as Python would; a def alone is harmless.
    values = evaluate("def f():\n    return 1\nx = 2\n").values
    assert values["x"] == 2


@pytest.mark.parametrize(("text", "line", "message"), [
    ("def f(n):\n    return f(n)\nx = f(1)\n", 2, "function calls nested too deeply"),
    ("a = [1, 1]; " + "a = [a, a]; " * 30 + "b = str(a)\n", 1,
     "(value too large|config takes too long)"),
    ("x = 1 / 0\n", 1, "division by zero"),
    ("x = 1 + 'a'\n", 1, "unsupported operand"),
    ("x = [1][5]\n", 1, "IndexError"),
    ("x = {'a': 1}['b']\n", 1, "KeyError"),
    ("x = int('z')\n", 1, "invalid literal"),
    ("x = '%d %d' % (1,)\n", 1, "not enough arguments"),
    ("raise ValueError('custom stop')\n", 1, "custom stop"),
    ("def f(a):\n    return a\nx = f()\n", 3, "missing argument 'a'"),
    ("def f(a):\n    return a\nx = f(1, 2)\n", 3, "takes 1 arguments"),
    ("x = 1\nx()\n", 2, "int object is not callable"),
    ("a, b = [1, 2, 3]\n", 1, "cannot unpack 3 values into 2 names"),
    ("x = (\n", 1, "syntax error"),
    ("print 'hello'\n", 1, "syntax error"),
])
def test_runtime_errors_name_their_line(text: str, line: int, message: str) -> None:
    with raises_at(line, ".*" + message):
        evaluate(text, "t.cfg")


def test_step_limit_stops_long_evaluations() -> None:
    text = "x = [[i for i in range(900)] for j in range(900)]\n"
    with raises_at(1, "config takes too long to evaluate"):
        evaluate(text, "t.cfg", limits=Limits(max_steps=100_000))


def test_source_size_limit() -> None:
    with raises_at(None, "config is too large"):
        evaluate("x = 1\n" * 10, "t.cfg", limits=Limits(max_source=20))


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConfigError):
        evaluate("x = " + "(" * 500 + "1" + ")" * 500 + "\n", "t.cfg")


# ----- keys and warnings -------------------------------------------------------------------


def test_unknown_key_warning_names_line() -> None:
    result = parse("name = 'web'\n\nfoo = 1\nmemroy = 256\n")
    assert result.warnings == [
        "t.cfg:3: unknown key 'foo' ignored",
        "t.cfg:4: unknown key 'memroy' ignored",
    ]


def test_helper_variables_and_functions_are_not_unknown_keys() -> None:
    text = ("base = '192.0.2.'\n_tmp = 1\ndef f(x):\n    return x\n"
            "name = f('web')\nip = base + '5'\n")
    result = parse(text)
    assert result.warnings == []
    assert result.config.net.ip == "192.0.2.5"


@pytest.mark.parametrize("key", sorted(IGNORED_KEYS))
def test_ignored_keys_are_silent(key: str) -> None:
    assert parse(f"name = 'web'\n{key} = 1\n").warnings == []


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_KEYS))
def test_unsupported_keys_warn(key: str) -> None:
    assert parse(f"name = 'web'\n{key} = 'x'\n").warnings == [
        f"t.cfg:2: {key} ignored: {UNSUPPORTED_KEYS[key]}"
    ]


def test_none_values_are_unset() -> None:
    config = cfg("name = 'web'\nramdisk = None\nkernel = ''\ncpus = ''\nbootloader = None\n")
    assert (config.ramdisk, config.kernel, config.cpus) == (None, None, None)


def test_last_assignment_wins() -> None:
    config = cfg("name = 'a'\nmemory = 256\nname = 'b'\nmemory += 256\n")
    assert (config.name, config.memory) == ("b", 512)


INVALID = [
    ("memory = 'lots'", "invalid memory = 'lots': expected a whole number"),
    ("memory = 8", "invalid memory = 8: Input should be greater than or equal to 16"),
    ("memory = True", "invalid memory = True: expected a whole number, not a boolean"),
    ("memory = 1.5", "invalid memory = 1.5: expected a whole number"),
    ("maxmem = -1", "invalid maxmem = -1: must be at least 1"),
    ("memory = 10**12", "invalid memory = 1000000000000: more than 16777216 MiB"),
    ("cap = 6401", "invalid cap = 6401: more than 6400"),
    ("ha_priority = 10**7", "invalid ha_priority = 10000000: expected -1000000..1000000"),
    ("vcpus = 0", "invalid vcpus = 0: must be at least 1"),
    ("vcpus = 65", "invalid vcpus = 65: Input should be less than or equal to 64"),
    ("cpus = '3-1'", "invalid cpus = '3-1': bad range '3-1'"),
    ("cpus = 'x'", "invalid cpus = 'x': bad item 'x'"),
    ("cpus = '^1'", "invalid cpus = '^1': it selects no CPU"),
    ("cpus = {}", "invalid cpus = {}: expected a cpu list"),
    ("name = 'bad name!'", "invalid name = 'bad name!': invalid domain name"),
    ("name = '42'", "invalid name = '42': domain name '42' must not be all digits"),
    ("name = ''", "invalid name = '': must not be empty"),
    ("name = 5", "invalid name = 5: expected a string, not int"),
    ("uuid = 'not-a-uuid'", "invalid uuid = 'not-a-uuid': invalid uuid"),
    ("builder = 'xenpv'", "invalid builder = 'xenpv': expected 'linux' or 'hvm'"),
    ("type = 'kvm'", "invalid type = 'kvm': expected 'pv', 'pvh' or 'hvm'"),
    ("kernel = ['a']", "invalid kernel = ['a']: expected a string, not list"),
    ("on_crash = 'explode'", "invalid on_crash = 'explode': expected one of coredump-destroy"),
    ("on_reboot = 'soft-reset'", "invalid on_reboot = 'soft-reset': expected one of"),
    ("restart = 'sometimes'", "invalid restart = 'sometimes': expected 'onreboot'"),
    ("cpu_weight = 0", "invalid cpu_weight = 0: Input should be greater than or equal to 1"),
    ("weight = 70000", "invalid weight = 70000: Input should be less than or equal to 65535"),
    ("cap = -5", "invalid cap = -5: Input should be greater than or equal to 0"),
    ("ip = '10.0.0.300'", "invalid ip = '10.0.0.300'"),
    ("gateway = 'router'", "invalid gateway = 'router'"),
    ("netmask = 'ff'", "invalid netmask = 'ff'"),
    ("hostname = 'a b'", "invalid hostname = 'a b': expected a host name"),
    ("dhcp = 'yes'", "invalid dhcp = 'yes': expected 'dhcp' or 'off'"),
    ("serial = 3", "invalid serial = 3: expected e.g. 'pty'"),
    ("boot = 'x'", "invalid boot = 'x': expected boot devices from 'acdn'"),
    ("ha = 'always'", "invalid ha = 'always': expected one of best-effort, fence, off, restart"),
    ("ha_priority = 'high'", "invalid ha_priority = 'high': expected a whole number"),
    ("hosts = [1]", "invalid hosts = [1]: expected a list of host names"),
    ("disk = 'phy:/dev/sda'", "invalid disk[0] 'phy:/dev/sda': no virtual device"),
    ("disk = [1]", "invalid disk = [1]: expected a list of strings"),
    ("disk = ['file:/a,xvda,w', 'file:/b,xvda,w']",
     "invalid disk[1] 'file:/b,xvda,w': device xvda used twice"),
    ("vif = ['mac=00:16:3e:zz:00:01']", "invalid vif[0] 'mac=00:16:3e:zz:00:01': invalid MAC"),
    ("vif = ['mac=00:16:3e:00:00:01', 'mac=00:16:3E:00:00:01']",
     "invalid vif[1] 'mac=00:16:3E:00:00:01': MAC 00:16:3e:00:00:01 used twice"),
]


@pytest.mark.parametrize(("setting", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_values_name_line_and_key(setting: str, message: str) -> None:
    text = "name = 'web'\n" + setting + "\n"
    if setting.startswith("name"):
        text = "memory = 128\n" + setting + "\n"
    with pytest.raises(ConfigError, match="^" + re.escape("t.cfg:2: " + message)):
        parse(text)


def test_missing_name() -> None:
    with raises_at(None, "missing required key 'name'"):
        parse("memory = 128\n")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.cfg"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config file not found")):
        load_config(path)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read config file")):
        load_config(tmp_path)


def test_warning_uses_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "web.cfg").write_text("name = 'web'\nkernel = 'vmlinuz'\nfoo = 1\n")
    monkeypatch.chdir(tmp_path)
    result = load_config("web.cfg")
    assert result.warnings == ["web.cfg:3: unknown key 'foo' ignored"]
    assert result.config.source_file == str(tmp_path / "web.cfg")
    assert result.config.kernel == str(tmp_path / "vmlinuz")


def test_relative_paths_are_relative_to_cwd(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = cfg("name = 'w'\nkernel = 'k/vmlinuz'\nramdisk = '../initrd'\n"
                 "disk = ['file:img/a.img,xvda,w', 'phy:vg/lv,xvdb,w', 'b.qcow2,qcow2,xvdc,rw']\n")
    assert config.kernel == str(tmp_path / "k/vmlinuz")
    assert config.ramdisk == str(tmp_path.parent / "initrd")
    assert [d.target for d in config.disks] == [
        str(tmp_path / "img/a.img"), "/dev/vg/lv", str(tmp_path / "b.qcow2")]


def test_parse_config_source_file() -> None:
    assert parse_config("name = 'a'\n").config.source_file is None
    assert parse_config("name = 'a'\n", "/etc/xen/a.cfg").config.source_file == "/etc/xen/a.cfg"


# ----- formats, actions, types --------------------------------------------------------------


@pytest.mark.parametrize(("text", "filename", "fmt"), [
    ("name = 'a'\n", "a.cfg", "xm"),
    ("name = 'a'\n", "a.xl", "xl"),
    ("name = 'a'\ntype = 'pv'\n", "a.cfg", "xl"),
    ("name = 'a'\ncmdline = 'root=/dev/xvda'\n", "a.cfg", "xl"),
    ("name = 'a'\ndisk = ['vdev=xvda, target=/a.img']\n", "a", "xl"),
    ("name = 'a'\ndisk = ['/a.img,raw,xvda,rw']\n", "a", "xl"),
    ("name = 'a'\ndisk = ['file:/a.img,xvda,w']\n", "a", "xm"),
    ("name = 'a'\nbuilder = 'hvm'\n", "a", "xm"),
    ("name = 'a' + 'b'\ntype = 'pv'\n", "a.xl", "xm"),
    ("if 1:\n    name = 'a'\n", "a", "xm"),
    ("xm_vars.check()\nname = 'a'\n", "a", "xm"),
    ("name = 'a'\nmemory = -5 + 300\n", "a", "xm"),
])
def test_format_detection(text: str, filename: str, fmt: str) -> None:
    assert parse_config(text, filename).config.source_format == fmt


def test_forced_format() -> None:
    text = "name = 'a'\ntype = 'hvm'\n"
    assert parse_config(text, fmt="xm").config.source_format == "xm"
    assert parse_config("name = 'a'\n", fmt="xl").config.source_format == "xl"
    with pytest.raises(ConfigError, match=r"^t\.cfg:2: xl config files hold only KEY = VALUE"):
        parse("name = 'a'\nmemory = 64 * 2\n", fmt="xl")
    with pytest.raises(ConfigError, match="unknown config format"):
        parse("name = 'a'\n", fmt="sxp")


@pytest.mark.parametrize(("text", "actions"), [
    ("name = 'a'\n", ("destroy", "restart", "restart")),
    ("name = 'a'\ntype = 'pv'\n", ("destroy", "restart", "destroy")),
    ("name = 'a'\non_crash = 'coredump-destroy'\n", ("destroy", "restart", "coredump-destroy")),
    ("name = 'a'\ntype = 'hvm'\non_poweroff = 'preserve'\non_reboot = 'rename-restart'\n",
     ("preserve", "rename-restart", "destroy")),
    ("name = 'a'\nrestart = 'never'\n", ("destroy", "destroy", "destroy")),
    ("name = 'a'\nrestart = 'always'\n", ("restart", "restart", "restart")),
    ("name = 'a'\non_reboot = 'preserve'\nrestart = 'onreboot'\n",
     ("destroy", "preserve", "destroy")),
])
def test_default_actions_by_format(text: str, actions: tuple[str, str, str]) -> None:
    a = cfg(text).actions
    assert (a.on_poweroff, a.on_reboot, a.on_crash) == actions


@pytest.mark.parametrize(("text", "dtype"), [
    ("", "pv"),
    ("builder = 'linux'\n", "pv"),
    ("builder = 'generic'\n", "pv"),
    ("builder = 'hvm'\n", "hvm"),
    ("type = 'pvh'\n", "pvh"),
    ("type = 'hvm'\n", "hvm"),
    ("type = 'pv'\nbuilder = 'hvm'\n", "pv"),
    ("builder = 'hvm'\ntype = 'pv'\n", "pv"),
])
def test_domain_type(text: str, dtype: str) -> None:
    assert cfg("name = 'a'\n" + text).type == dtype


def test_hvmloader_is_dropped_only_for_hvm() -> None:
    loader = "kernel = '/usr/lib/xen/boot/hvmloader'\n"
    assert cfg("name = 'a'\nbuilder = 'hvm'\n" + loader).kernel is None
    assert cfg("name = 'a'\n" + loader).kernel == "/usr/lib/xen/boot/hvmloader"


def test_xen_3_0_vmx_guests_are_hvm() -> None:
    """Xen 3.0.0's name for HVM was VMX (builder 'vmx', firmware 'vmxloader')."""
    c = cfg("name = 'old'\nbuilder = 'vmx'\nkernel = '/usr/lib/xen/boot/vmxloader'\n"
            "memory = 128\ndisk = ['file:/var/images/el3.img,ioemu:hda,w']\n")
    assert (c.type, c.kernel, c.disks[0].vdev) == ("hvm", None, "hda")


@pytest.mark.parametrize(("value", "expected"), [
    ("'0-3,5,^1'", "0,2-3,5"),
    ("'3'", "3"),
    ("2", "2"),
    ("' 1 , 2 , 3 '", "1-3"),
    ("[0, 1]", "0-1"),
    ("['2-5', '^3']", "2,4-5"),
    ("'all'", None),
    ("'all,^0'", "all,^0"),
    ("''", None),
    ("[]", None),
])
def test_cpus_normalization(value: str, expected: str | None) -> None:
    assert cfg(f"name = 'a'\ncpus = {value}\n").cpus == expected


def test_numa_cpus_warn() -> None:
    result = parse("name = 'a'\ncpus = 'nodes:0'\n")
    assert result.config.cpus is None
    assert result.warnings == [
        "t.cfg:2: NUMA node affinity ('nodes:') is not supported; cpus ignored"]


@pytest.mark.parametrize(("text", "sched"), [
    ("cpu_weight = 512\ncpu_cap = 50\n", (512, 50)),
    ("weight = '128'\ncap = 0\n", (128, 0)),
    ("", (256, 0)),
])
def test_sched(text: str, sched: tuple[int, int]) -> None:
    s = cfg("name = 'a'\n" + text).sched
    assert (s.weight, s.cap) == sched


@pytest.mark.parametrize(("text", "net"), [
    ("ip = '10.0.0.2'\nnetmask = '255.0.0.0'\ngateway = '10.0.0.1'\nhostname = 'h'\n",
     {"ip": "10.0.0.2", "netmask": "255.0.0.0", "gateway": "10.0.0.1", "hostname": "h",
      "dhcp": None}),
    ("dhcp = 'dhcp'\nnetmask = '24'\n", {"ip": None, "netmask": "24", "gateway": None,
                                          "hostname": None, "dhcp": "dhcp"}),
])
def test_net_params(text: str, net: dict[str, str | None]) -> None:
    assert cfg("name = 'a'\n" + text).net.model_dump() == net


@pytest.mark.parametrize(("text", "ha"), [
    ("ha = 'best-effort'\nhosts = 'n1, n2 n3'\n",
     {"ha": "best-effort", "ha_priority": 0, "ha_group": None, "hosts": ["n1", "n2", "n3"]}),
    ("ha = 1\nha_priority = -2\nha_group = 'db'\n",
     {"ha": "restart", "ha_priority": -2, "ha_group": "db", "hosts": []}),
    ("ha = False\n", {"ha": "off", "ha_priority": 0, "ha_group": None, "hosts": []}),
])
def test_ha_params(text: str, ha: dict[str, object]) -> None:
    assert cfg("name = 'a'\n" + text).ha.model_dump() == ha


def test_serial_and_boot() -> None:
    result = parse("name = 'a'\nserial = ['file:/tmp/s', 'pty']\nboot = 'dc'\n")
    assert (result.config.serial, result.config.boot) == ("file:/tmp/s", "dc")
    assert result.warnings == ["t.cfg:2: only the first serial port is used"]


# ----- disks --------------------------------------------------------------------------------

DISKS = [
    ("file:/img/a.img,xvda,w", {"target": "/img/a.img", "vdev": "xvda", "mode": "w"}),
    ("phy:/dev/vg/lv,hda,r", {"target": "/dev/vg/lv", "vdev": "hda", "mode": "r"}),
    ("phy:sda6,sda6,r", {"target": "/dev/sda6", "vdev": "sda6"}),
    ("tap:aio:/img/b.img,xvdb,w", {"target": "/img/b.img", "format": "raw"}),
    ("tap:qcow2:/img/c.qcow2,xvdc,w", {"target": "/img/c.qcow2", "format": "qcow2"}),
    ("tap:tapdisk:aio:/img/d.img,xvdd,w!", {"target": "/img/d.img", "mode": "w"}),
    ("tap2:tapdisk:qcow2:/img/e.qcow2,xvde,w", {"format": "qcow2"}),
    ("file:/x.iso,hdc:cdrom,r", {"target": "/x.iso", "vdev": "hdc", "devtype": "cdrom",
                                 "mode": "r"}),
    ("phy:/dev/cdrom,ioemu:hdc:cdrom,r", {"vdev": "hdc", "devtype": "cdrom"}),
    ("file:/img/a.img,hda:disk,w", {"vdev": "hda", "devtype": "disk"}),
    ("file:/img/a.img,xvda,w,Domain-0", {"target": "/img/a.img"}),
    ("format=raw, vdev=xvda, access=rw, target=/path", {"target": "/path", "vdev": "xvda",
                                                         "mode": "w", "format": "raw"}),
    ("vdev=xvdb, target=/a,b.img", {"target": "/a,b.img"}),
    ("format=qcow2,vdev=xvdb,access=ro,target=/q.qcow2", {"format": "qcow2", "mode": "r"}),
    ("/path,raw,xvda,rw", {"target": "/path", "format": "raw", "vdev": "xvda", "mode": "w"}),
    ("/path,qcow2,xvda", {"format": "qcow2", "mode": "w"}),
    ("/path,,xvda,ro", {"format": "raw", "mode": "r"}),
    ("/x.iso,raw,hdc,ro,devtype=cdrom", {"devtype": "cdrom", "mode": "r"}),
    ("/x.iso,raw,hdc,cdrom", {"devtype": "cdrom", "mode": "r"}),
    ("/x.iso,raw,hdc,rw,cdrom", {"devtype": "cdrom", "mode": "r"}),
    ("qcow2:/q.qcow2,xvda,w", {"target": "/q.qcow2", "format": "qcow2"}),
    ("raw:/r.img,xvda,w", {"format": "raw"}),
    ("/p.img,raw,xvda,rw,discard,direct-io-safe,backendtype=qdisk", {"target": "/p.img"}),
    ("vdev=xvda,target=/a.img", {"mode": "w", "target": "/a.img"}),
    ("vdev=xvda,target=/a.img,vdev=xvdb", {"target": "/a.img,vdev=xvdb"}),
    ("file:/a.img,xvda,w,iops=100,bps=10M", {"iops": 100, "bps": 10 << 20}),
    ("/a.img,raw,xvda,rw,iops_rd=5,iops_wr=6,bps_rd=512K,bps_wr=1048576",
     {"iops_rd": 5, "iops_wr": 6, "bps_rd": 512 << 10, "bps_wr": 1 << 20}),
    ("vdev=xvda, bps=1.5GiB/s, iops=7, target=/a.img", {"bps": 3 << 29, "iops": 7}),
]


@pytest.mark.parametrize(("spec", "expected"), DISKS, ids=[d[0] for d in DISKS])
def test_disk_syntaxes(spec: str, expected: dict[str, object]) -> None:
    disk = parse_disk(spec)
    assert disk is not None
    dumped = disk.model_dump()
    assert {k: dumped[k] for k in expected} == expected


@pytest.mark.parametrize("spec", [",hdc:cdrom,r", "file:,hdc:cdrom,r", ",,hdd,ro,cdrom",
                                  "format=empty, vdev=hdc, devtype=cdrom"])
def test_empty_cdrom_is_left_out_with_a_note(spec: str) -> None:
    notes: list[str] = []
    assert parse_disk(spec, notes) is None
    assert len(notes) == 1
    assert "empty CD-ROM drive" in notes[0]


DISK_NOTES = [
    ("file:/a.qcow2,xvda,w", "looks like qcow2 but is read as raw"),
    ("vdev=xvda, script=block-drbd, target=/a.img", "block script 'block-drbd' ignored"),
    ("file:/a.img,xvda,w,Domain-0", "backend domain 'Domain-0' ignored"),
]


@pytest.mark.parametrize(("spec", "note"), DISK_NOTES)
def test_disk_notes(spec: str, note: str) -> None:
    notes: list[str] = []
    assert parse_disk(spec, notes) is not None
    assert any(note in n for n in notes), notes


BAD_DISKS = [
    ("phy:/dev/sda", "no virtual device"),
    ("file:/a.img,floppy,w", "bad virtual device 'floppy'"),
    ("file:/a.img,xvda,x", "bad access mode 'x'"),
    (",xvda,w", "no target"),
    ("file:/a.img,hda:tape,w", "bad device type 'tape'"),
    ("tap:vhd:/a.vhd,xvda,w", "disk format 'vhd' is not supported"),
    ("/a.img,vhd,xvda,w", "disk format 'vhd' is not supported"),
    ("format=vmdk, vdev=xvda, target=/a", "disk format 'vmdk' is not supported"),
    ("format=weird, vdev=xvda, target=/a", "unknown disk format 'weird'"),
    ("drbd:res0,xvda,w", "disk type 'drbd:' is not supported"),
    ("vdev=xvda, colour=blue, target=/a", "unknown disk setting 'colour'"),
    ("vdev=xvda, vdev=xvdb, target=/a", "'vdev' given twice"),
    ("/a,raw,xvda,rw,extra", "too many items"),
    ("/a,raw,xvda,rw,vdev=xvdb", "'vdev' given twice"),
    ("vdev=xvda, devtype=tape, target=/a", "bad devtype 'tape'"),
    ("file:/a,xvda,w,iops=0", "bad iops '0'"),
    ("file:/a,xvda,w,iops=lots", "bad iops 'lots'"),
    ("file:/a,xvda,w,iops=10000000000", "bad iops '10000000000'"),
    ("file:/a,xvda,w,bps=10Mb", "bad size '10Mb'"),
    ("file:/a,xvda,w,bps=0", "out of range"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_DISKS, ids=[b[0] for b in BAD_DISKS])
def test_bad_disks(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_disk(spec)


def test_disk_errors_in_a_file_name_the_line() -> None:
    with raises_at(3, re.escape("invalid disk[1] 'file:/b,xvdb,q': bad access mode 'q'")):
        parse("name = 'a'\n\ndisk = ['file:/a,xvda,w',\n        'file:/b,xvdb,q']\n")


@pytest.mark.parametrize(("text", "size"), [
    ("1048576", 1 << 20), ("10M", 10 << 20), ("10MB", 10 << 20), ("10MiB/s", 10 << 20),
    ("512k", 512 << 10), ("2G", 2 << 30), ("1T", 1 << 40),
])
def test_parse_bytes(text: str, size: int) -> None:
    assert parse_bytes(text) == size


# ----- vifs ---------------------------------------------------------------------------------

VIFS = [
    ("", {}),
    ("bridge=xenbr1", {"bridge": "xenbr1"}),
    ("mac=00:16:3E:00:00:11, bridge=xenbr0", {"mac": "00:16:3e:00:00:11", "bridge": "xenbr0"}),
    ("mac=00:16:3e:00:00:11,bridge=xenbr0,ip=192.0.2.5,rate=10Mb/s,model=e1000,vifname=web.0",
     {"mac": "00:16:3e:00:00:11", "bridge": "xenbr0", "ip": "192.0.2.5", "rate": "10Mb/s",
      "model": "e1000", "vifname": "web.0"}),
    ("type=ioemu, bridge=xenbr0, model=ne2k_pci", {"bridge": "xenbr0", "model": "ne2k_pci"}),
    ("script=vif-bridge, backend=0, bridge=br0", {"bridge": "br0"}),
    ("ip=192.0.2.5 192.0.2.6", {"ip": "192.0.2.5 192.0.2.6"}),
    ("rate=1MB/s@20ms", {"rate": "1MB/s@20ms"}),
    ("rate=100Kb", {"rate": "100Kb"}),
]


@pytest.mark.parametrize(("spec", "expected"), VIFS, ids=[v[0] or "empty" for v in VIFS])
def test_vif_syntaxes(spec: str, expected: dict[str, str]) -> None:
    notes: list[str] = []
    assert parse_vif(spec, notes) == VifSpec(**expected)
    assert notes == []


BAD_VIFS = [
    ("mac=00:16:3e:00:00", "invalid MAC address"),
    ("mac=01:16:3e:00:00:01", "is a multicast address"),
    ("bridge", "expected key=value"),
    ("bridge=xenbr0, bridge=xenbr1", "'bridge' given twice"),
    ("bridge=a/b", "bad bridge 'a/b'"),
    ("vifname=averyveryverylongname", "bad vifname"),
    ("ip=10.0.0.999", "bad ip '10.0.0.999'"),
    ("rate=fast", "bad rate 'fast'"),
    ("model=e1000;rm", "bad model"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_VIFS, ids=[b[0] for b in BAD_VIFS])
def test_bad_vifs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_vif(spec)


def test_unknown_vif_setting_warns() -> None:
    result = parse("name = 'a'\nvif = ['bridge=br0, mtu=9000']\n")
    assert result.config.vifs == [VifSpec(bridge="br0")]
    assert result.warnings == ["t.cfg:2: unknown vif setting 'mtu' ignored"]


def test_load_config_leaves_macs_unset() -> None:
    assert [v.mac for v in load_config(CONFIGS / "web.cfg").config.vifs] == [
        "00:16:3e:12:34:56", None]


# ----- MACs ---------------------------------------------------------------------------------

MAC_RE = re.compile(r"^00:16:3e:[0-7][0-9a-f]:[0-9a-f]{2}:[0-9a-f]{2}$")


def test_generate_mac_format() -> None:
    rng = random.Random(1)
    macs = [generate_mac(rng=rng) for _ in range(500)]
    assert XEN_OUI == "00:16:3e"
    assert all(MAC_RE.fullmatch(m) for m in macs)
    assert len(set(macs)) > 490
    assert MAC_RE.match(generate_mac())


class _Replay(random.Random):
    """Yields the same 'random' octets twice, then new ones."""

    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values = values

    def randint(self, a: int, b: int) -> int:
        return self.values.pop(0) if self.values else super().randint(a, b)


def test_generate_mac_avoids_used_case_insensitively() -> None:
    rng = _Replay([0x12, 0x34, 0x56, 0x12, 0x34, 0x56, 0x00, 0x00, 0x01])
    assert generate_mac(["00:16:3E:12:34:56"], rng) == "00:16:3e:00:00:01"


def test_generate_mac_gives_up_when_space_is_exhausted() -> None:
    class Stuck(random.Random):
        def randint(self, a: int, b: int) -> int:
            return 0

    with pytest.raises(Conflict):
        generate_mac(["00:16:3e:00:00:00"], Stuck())


def test_assign_macs_fills_only_missing_and_is_unique() -> None:
    config = DomainConfig(name="a", vifs=[VifSpec(), VifSpec(mac="00:16:3e:00:00:01"),
                                          VifSpec(bridge="b")] + [VifSpec()] * 5)
    used = {"00:16:3e:7f:ff:ff"}
    done = assign_macs(config, used)
    macs = [v.mac for v in done.vifs]
    assert all(m is not None and MAC_RE.fullmatch(m) for m in macs)
    assert macs[1] == "00:16:3e:00:00:01"
    assert done.vifs[2].bridge == "b"
    assert len(set(macs)) == len(macs)
    assert not used & set(macs)
    assert [v.mac for v in config.vifs][:3] == [None, "00:16:3e:00:00:01", None]  # unchanged


def test_assign_macs_avoids_macs_of_the_same_config(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = _Replay([0, 0, 1, 0, 0, 5, 0, 0, 5, 0, 0, 6])
    monkeypatch.setattr(random, "SystemRandom", lambda: rng)
    config = DomainConfig(name="a", vifs=[VifSpec(mac="00:16:3e:00:00:01"), VifSpec(),
                                          VifSpec()])
    done = assign_macs(config, ())
    assert [v.mac for v in done.vifs] == [
        "00:16:3e:00:00:01", "00:16:3e:00:00:05", "00:16:3e:00:00:06"]


def test_assign_macs_without_missing_returns_config() -> None:
    config = DomainConfig(name="a", vifs=[VifSpec(mac="00:16:3e:00:00:01")])
    assert assign_macs(config, ["00:16:3e:00:00:02"]) == config

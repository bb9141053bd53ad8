"""Hypothesis fuzz of the xm/xl config reader (`parse_config`, `load_config`).

Properties, for arbitrary text and bytes and for grammar-built near-valid configs (real keys,
disk/vif specs from real option names, expressions, imports, comprehensions, hostile code):

* the only exception is `ConfigError`;
* nothing is executed (hostile snippets try to create a marker file);
* each file is read within 2 s of CPU time (CPU, not wall-clock: the test machine is shared;
  the worst case, a comprehension running into the step limit, takes about 0.7 s);
* a config that parses is a `DomainConfig` that survives the API's JSON round trip;
* memory bombs fail fast under an address-space limit (in a subprocess).

Derandomized (the same examples every run). More examples: `GRIDVM_FUZZ_EXAMPLES=2000 pytest
tests/test_config_fuzz.py`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gridvm.config import xmdisplay
from gridvm.config.model import DiskSpec, DomainConfig, VifSpec
from gridvm.config.xmfile import (
    IGNORED_KEYS,
    KNOWN_KEYS,
    UNSUPPORTED_KEYS,
    load_config,
    parse_config,
)
from gridvm.errors import ConfigError

EXAMPLES = int(os.environ.get("GRIDVM_FUZZ_EXAMPLES", "250"))
MARKER_DIR = Path(tempfile.mkdtemp(prefix="gridvm-fuzz-"))
MARKER = MARKER_DIR / "executed"

CPU_LIMIT_S = 2.0
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----- the grammar ---------------------------------------------------------------------------

KEYS = sorted(KNOWN_KEYS | IGNORED_KEYS | set(UNSUPPORTED_KEYS))
HOSTILE = [
    f"open({str(MARKER)!r}, 'w')",
    f"__import__('os').system('touch {MARKER}')",
    f"os.system('touch {MARKER}')",
    f"exec(\"open({str(MARKER)!r}, 'w')\")",
    f"eval(\"__import__('os').system('touch {MARKER}')\")",
    "().__class__.__bases__[0].__subclasses__()",
    "''.__class__.__mro__[1]",
    f"getattr(os, 'system')('touch {MARKER}')",
    "globals()", "vars()", "compile('1', 'x', 'eval')", "breakpoint()",
    "type('x', (), {})", "(lambda: 1)()", "os.uname.__globals__",
    "re.search.__self__", "re.compile('x')", "xm_vars.__class__", "xm_vars.env.__dict__",
    "[c for c in ().__class__.__base__.__subclasses__()]",
    "f'{__import__(\"os\").system(\"touch x\")}'", "os.popen('id')",
]
HOSTILE_STMTS = [
    "import subprocess", "from os import system", "import os.path",
    f"with open({str(MARKER)!r}, 'w') as f:\n    pass",
    "for i in range(10**9):\n    pass", "while True:\n    pass",
    "class A:\n    pass", "global x", "del name", "try:\n    pass\nexcept:\n    pass",
    "async def f():\n    pass", "assert 0", "def f():\n    import os\n    return os",
    "def f(x=open('/etc/passwd')):\n    return x",
]
BOMBS = [
    "9**9**9", "10**10**8", "'a'*10**9", "[0]*10**9", "[[0]*1000]*1000", "range(10**9)",
    "'%0999999d' % 1", "f'{1:999999}'", "'x'*999999 + 'y'*999999", "int('9'*5000)",
    "str(2**4096)", "[i for i in range(10**6) for j in range(10**6)]", "10.0**400",
    "2**-10**1000", "1/0", "[1][5]", "{}['x']", "{[1]: 2}", "'a' < 1", "-'a'",
    "re.search('(a+)+$', 'a'*40 + 'b')", "re.search('(a|aa)*b', 'a'*100)",
    "re.match('x'*300, 'x')", "re.search('(', 'x')", "os.uname()[99]",
]
VDEVS = ["xvda", "xvdb", "hda", "hdc", "sda", "vdz", "xvda1", "hdc:cdrom", "ioemu:hda",
         "qq", "", "xvd", "hdc:floppy"]
DISK_PREFIXES = ["phy:", "file:", "tap:aio:", "tap:qcow2:", "tap2:tapdisk:aio:", "", "qcow:",
                 "vhd:", "foo:", "PHY:", "phy:/dev/", "file:../"]
DISK_KEYS = ["target", "format", "vdev", "access", "devtype", "iops", "iops_rd", "iops_wr",
             "bps", "bps_rd", "bps_wr", "script", "backendtype", "backend", "specification",
             "direct-io-safe", "discard", "cdrom", "colo", "bogus"]
VIF_KEYS = sorted({*VifSpec.model_fields, "type", "script", "backend", "devid", "bogus",
                   "mac", "bridge", "ip", "rate", "model", "vifname"})
VFB_KEYS = ["vnc", "vnclisten", "vncdisplay", "vncunused", "vncpasswd", "type", "keymap",
            "sdl", "display"]

ident = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
key = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), ident)
small_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
option_value = st.one_of(
    small_text,
    st.sampled_from(["1", "0", "w", "r", "ro", "rw", "w!", "raw", "qcow2", "empty", "cdrom",
                     "disk", "10M", "1.5GiB/s", "100", "-1", "0x10", "00:16:3e:00:00:01",
                     "01:00:00:00:00:00", "xenbr0", "10.0.0.1/24", "10Mb/s@20ms", "e1000",
                     "virtio-net", "/img/x.img", "a,b", "=", "target=/x"]),
    st.integers(-5, 10**12).map(str),
)


@st.composite
def disk_spec(draw: st.DrawFn) -> str:
    if draw(st.booleans()):  # xm: PREFIX:target,vdev,mode
        parts = [draw(st.sampled_from(DISK_PREFIXES)) + draw(st.sampled_from(
            ["/img/a.img", "vg/lv", "", "a b", "x.qcow2", "/dev/sdb", "\x00"]))]
        parts += [draw(st.sampled_from(VDEVS)), draw(st.sampled_from(["w", "r", "", "x"]))]
        parts += draw(st.lists(option_value, max_size=2))
        return ",".join(parts)
    items = draw(st.lists(st.tuples(st.sampled_from(DISK_KEYS), option_value), max_size=6))
    return ", ".join(f"{k}={v}" if k not in ("cdrom", "colo") else k for k, v in items)


@st.composite
def vif_spec(draw: st.DrawFn) -> str:
    items = draw(st.lists(st.tuples(st.sampled_from(VIF_KEYS), option_value), max_size=5))
    sep = draw(st.sampled_from([", ", ",", " , "]))
    return sep.join(f"{k}={v}" for k, v in items)


@st.composite
def vfb_spec(draw: st.DrawFn) -> str:
    items = draw(st.lists(st.tuples(st.sampled_from(VFB_KEYS), option_value), max_size=5))
    return ",".join(f"{k}={v}" for k, v in items)


literal = st.one_of(
    st.integers(-(2**70), 2**70).map(repr),
    st.sampled_from(["1", "128", "0", "-1", "True", "None", "1.5", "1e308", "'hvm'", "'pv'",
                     "'linux'", "'pygrub'", "'restart'", "'destroy'", "'0-3,^1'", "'all'",
                     "'nodes:0'", "'c'", "'dc'", "'pty'", "''", "'x'*1000"]),
    small_text.map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f"float({str(f)!r})"),
)


def _expr(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(children, max_size=3).map(lambda xs: "(" + "".join(x + ", " for x in xs) + ")"),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]),
                  children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(children, st.sampled_from(["==", "<", "in", "not in", "is", "and", "or"]),
                  children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.tuples(children, children).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(children, children).map(lambda t: f"{t[0]}[{t[1]}:]"),
        st.tuples(st.sampled_from(["int", "str", "float", "bool", "len", "range", "max", "min",
                                   "abs", "list", "f", "xm_vars.env.get", "os.uname",
                                   "re.search", "re.match"]),
                  st.lists(children, max_size=2)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        children.map(lambda c: f"[x for x in {c} if x]"),
        st.tuples(children, children).map(lambda t: f"f'{{{t[0]}}}-{{{t[1]}!r:>5}}'"),
        children.map(lambda c: f"'%s-%d' % {c}"),
        children.map(lambda c: f"not {c}"),
    )


expr = st.recursive(
    st.one_of(literal, st.sampled_from(KEYS[:20] + ["xm_file", "xm_vars", "os", "re"]),
              st.sampled_from(BOMBS), st.sampled_from(HOSTILE)),
    _expr, max_leaves=12)

value = st.one_of(
    literal, expr,
    st.lists(disk_spec(), max_size=4).map(repr),
    st.lists(vif_spec(), max_size=4).map(repr),
    st.lists(vfb_spec(), max_size=2).map(repr),
    disk_spec().map(repr),
)


SPEC_KEYS = {"disk": disk_spec(), "vif": vif_spec(), "vfb": vfb_spec()}


@st.composite
def setting(draw: st.DrawFn) -> str:
    """A near-valid `KEY = VALUE`: a real key with a value of a plausible shape."""
    k = draw(st.sampled_from(KEYS))
    if k in SPEC_KEYS:
        specs = draw(st.lists(SPEC_KEYS[k], max_size=4))
        return f"{k} = {specs!r}"
    return f"{k} = {draw(literal)}"


@st.composite
def statement(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 19))
    if kind <= 11:
        return draw(setting())
    k, v = draw(key), draw(value)
    if kind == 12:
        return f"{k} = {v}"
    if kind == 13:
        return f"{k} += {v}"
    if kind == 14:
        return f"if {draw(expr)}:\n    {k} = {v}\nelse:\n    {draw(setting())}"
    if kind == 15:
        return draw(st.sampled_from(["import os, re", "import os", "import re as r",
                                     "xm_vars.check()", "xm_vars.var('vmid', 'id', f)",
                                     "def f(var, val):\n    if not val:\n        raise "
                                     "ValueError('no')\n    return int(val)"]))
    if kind == 16:
        return draw(st.sampled_from(HOSTILE_STMTS))
    if kind == 17:
        return f"{k} = {draw(st.sampled_from(HOSTILE + BOMBS))}"
    return f"{k} = {draw(expr)}"


@st.composite
def config(draw: st.DrawFn) -> str:
    lines = draw(st.lists(statement(), max_size=10))
    if draw(st.integers(0, 9)):
        name = draw(st.sampled_from(["web", "web", "db-1", "a b", "x" * 70, ""]))
        lines.insert(draw(st.integers(0, len(lines))), f"name = {name!r}")
    return "\n".join(lines) + "\n"

# ----- the properties ------------------------------------------------------------------------


@contextlib.contextmanager
def _bounded(text: str) -> Iterator[None]:
    """The block (one read) takes at most CPU_LIMIT_S of CPU and executes nothing."""
    start = time.process_time()
    try:
        yield
    finally:   # also when the read raised (ConfigError)
        took = time.process_time() - start
        assert took < CPU_LIMIT_S, f"reading took {took:.2f} s of CPU: {text[:200]!r}"
        assert not MARKER.exists(), f"config code was executed: {text!r}"


def _quiet(read: Callable[[], object]) -> None:
    with contextlib.suppress(ConfigError):
        read()


def _check(text: str, filename: str = "fuzz.cfg",
           variables: dict[str, str] | None = None) -> None:
    """Parse `text`: only ConfigError, nothing executed, and a result the API re-validates."""
    try:
        with _bounded(text):
            result = parse_config(text, filename, variables)
    except ConfigError as exc:
        assert not str(exc).endswith((":", ": ")), f"a ConfigError without a reason: {exc}"
    else:
        assert isinstance(result.config, DomainConfig)
        again = DomainConfig.model_validate(result.config.model_dump(mode="json"))
        assert again == result.config


@FUZZ
@given(st.text(max_size=400))
@example("name = 'a'\nx = " + "-" * 100_000 + "1")   # the parser's own limit, not an empty message
@example("name = 'a'\nx = " + "[],\n" * 60_000)      # 1 AST node per 4 characters
def test_arbitrary_text(text: str) -> None:
    _check(text)


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_from_a_file(data: bytes) -> None:
    path = MARKER_DIR / "bytes.cfg"
    path.write_bytes(data)
    with _bounded(repr(data)):
        _quiet(lambda: load_config(path))


@FUZZ
@given(config(), st.dictionaries(st.sampled_from(["vmid", "name", "x"]), small_text, max_size=2))
@example("name = 'a'\ndisk = ['phy:/dev/x,xvda,w', 'file:/y,xvda,w']\n", {})
@example("name = 'a'\nmaxvcpus = 2\nvcpus = 3\n", {})
@example("name = 'a'\nvif = ['mac=00:16:3e:00:00:01', 'mac=00:16:3E:00:00:01']\n", {})
def test_structured_configs(text: str, variables: dict[str, str]) -> None:
    _check(text, variables=variables)


@FUZZ
@given(st.lists(setting(), max_size=12), st.sampled_from(["fuzz.cfg", "fuzz.xl"]))
def test_near_valid_settings(settings_: list[str], filename: str) -> None:
    _check("name = 'web'\n" + "\n".join(settings_) + "\n", filename)


@FUZZ
@given(st.lists(disk_spec(), min_size=1, max_size=3), st.lists(vif_spec(), max_size=3),
       st.sampled_from(["fuzz.cfg", "fuzz.xl"]))
def test_disk_and_vif_specs(disks: list[str], vifs: list[str], filename: str) -> None:
    _check(f"name = 'd'\ndisk = {disks!r}\nvif = {vifs!r}\n", filename)


@FUZZ
@given(st.sampled_from(HOSTILE + BOMBS), st.sampled_from(["x = {}", "name = {}",
                                                          "if {}:\n    pass",
                                                          "def f():\n    return {}\nx = f()",
                                                          "x = [{} for i in [1]]",
                                                          "x = f'{{{}}}'"]))
def test_hostile_code_is_refused(code: str, template: str) -> None:
    text = "name = 'h'\nimport os, re\n" + template.format(code) + "\n"
    with _bounded(text):
        _quiet(lambda: parse_config(text, "hostile.cfg"))


def test_the_marker_shows_execution() -> None:
    """Run by Python itself, a hostile snippet does leave the marker (so its absence counts)."""
    eval(HOSTILE[1])  # noqa: S307 - the point of the check
    assert MARKER.exists()
    MARKER.unlink()


def test_display_keys_are_fuzzed() -> None:
    """The grammar's keys include every handler, so the display keys are exercised too."""
    assert set(xmdisplay.HANDLERS) <= set(KEYS)
    assert set(DiskSpec.model_fields) - {"target", "vdev", "mode", "format", "devtype", "slot"} <= {
        k.replace("-", "_") for k in DISK_KEYS}


_BOMB_RUNNER = textwrap.dedent("""\
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))
    from gridvm.config.xmfile import parse_config
    from gridvm.errors import ConfigError
    for text in sys.stdin.read().split("\\0"):
        start = time.process_time()
        try:
            parse_config(text)
        except ConfigError:
            pass
        took = time.process_time() - start
        assert took < 2, (took, text[:80])
    print("ok")
""")


def test_memory_bombs_fail_fast_under_an_address_space_limit() -> None:
    """Big values are refused before they are built; the largest file is refused cheaply."""
    texts = [f"name = 'b'\nx = {bomb}\n" for bomb in BOMBS] + [
        "name = 'b'\nx = " + "[]," * 87_000,           # 256 KiB of AST nodes
        "name = 'b'\nx = " + "[]," * 330_000,          # 1 MB: refused before parsing
        "name = 'b'\nx = 'a'\n" * 23_000,                # many statements
        "x = " + "1+" * 120_000 + "1",                   # deep expression
        "name = 'b'\na = 'a' * 999_000\nb = [a] * 1 + [a]",
        "name = 'b'\na = [[1] * 400] * 400\nb = str(a)",
    ]
    proc = subprocess.run([sys.executable, "-c", _BOMB_RUNNER], input="\0".join(texts),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"

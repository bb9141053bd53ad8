"""The value grammars of xm/xl config files: numbers, cpu lists, sizes, and the disk and vif
specification strings of both tools (`file:/x.img,xvda,w`, `vdev=xvda, target=/x.img`,
`mac=…, bridge=…, rate=…`). Each parser raises ValueError with the reason; the reader
(`gridvm.config.xmfile`) turns that into a ConfigError naming file:line and key."""

from __future__ import annotations

import ipaddress
import os
import re

from pydantic import ValidationError

from gridvm.config.model import DiskSpec, VifSpec

_MAX_IOPS = 10**9


# ----- small value parsers (raise ValueError with the reason) ----------------------------


def _as_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", value):
        return int(value)
    raise ValueError("expected a whole number")


def _as_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, not {type(value).__name__}")
    return value


def _str_list(value: object) -> list[str]:
    """A list of strings; a single string counts as a one-item list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [str(v) for v in value]
    raise ValueError("expected a list of strings")


def _abspath(path: str) -> str:
    return os.path.abspath(path)


_CPU_TOKEN = re.compile(r"\^?\d{1,4}(?:-\d{1,4})?")


def normalize_cpus(value: object) -> str | None:
    """A Xen cpu list (string, int, or list of them) as one compact cpu-list string.

    Items apply left to right (`^N` removes); `all` (alone: no pinning -> None) is kept
    symbolic because the host's CPU count is not known here.
    """
    items: list[str]
    if isinstance(value, bool):
        raise ValueError("expected a cpu list such as '0-3,^1'")
    if isinstance(value, int):
        items = [str(value)]
    elif isinstance(value, str):
        items = [value]
    elif isinstance(value, list | tuple) and all(
        isinstance(v, int | str) and not isinstance(v, bool) for v in value
    ):
        items = [str(v) for v in value]
    else:
        raise ValueError("expected a cpu list such as '0-3,^1'")
    tokens = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not tokens or tokens == ["all"]:
        return None
    cpus: set[int] = set()
    for token in tokens:
        if token == "all":
            return ",".join(tokens)
        if token.startswith("nodes:"):
            raise NotImplementedError("NUMA node affinity ('nodes:') is not supported")
        if not _CPU_TOKEN.fullmatch(token):
            raise ValueError(f"bad item {token!r} (expected N, N-M, ^N or ^N-M)")
        first, _, last = token.lstrip("^").partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise ValueError(f"bad range {token!r}")
        if token.startswith("^"):
            cpus.difference_update(range(lo, hi + 1))
        else:
            cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ValueError("it selects no CPU")
    return _compact(sorted(cpus))


def _compact(cpus: list[int]) -> str:
    parts: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], -2]:
        if cpu != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cpu
        prev = cpu
    return ",".join(parts)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?B)?(?:/s)?")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """`10M`, `512K`, `1.5GiB/s`, `1048576` -> bytes (binary multiples)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"bad size {text!r} (expected e.g. 10M, 512K or a number of bytes)")
    number = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if number < 1 or number >= 1 << 62:
        raise ValueError(f"size {text!r} out of range")
    return int(number)


# ----- disks -------------------------------------------------------------------------------

_VDEV = re.compile(r"(?:xvd|hd|sd|vd)[a-z]{1,3}\d{0,3}")
_FORMATS = {"raw": "raw", "qcow2": "qcow2", "aio": "raw", "sync": "raw"}
_UNSUPPORTED_FORMATS = {"qcow", "vhd", "qed", "ram", "vmdk"}
_TRANSPORTS = {"file", "tap", "tap2", "tapdisk", "phy", "ioemu"}
_DISK_FLAGS = {"cdrom", "discard", "no-discard", "direct-io-safe", "colo"}
_DISK_IGNORED = {"backendtype", "backend", "script", "discard", "no-discard",
                 "direct-io-safe", "specification", "trusted", "untrusted"}
_THROTTLES = ("iops", "iops_rd", "iops_wr", "bps", "bps_rd", "bps_wr")
_ACCESS = {"r": "r", "ro": "r", "w": "w", "rw": "w", "w!": "w"}


def _split_disk(spec: str) -> list[str]:
    """Comma-separated items; `target=` takes the rest of the string (it may hold commas)."""
    items: list[str] = []
    rest = spec
    while True:
        head, sep, tail = rest.partition(",")
        if head.strip().startswith("target="):
            items.append(rest.strip())
            return items
        items.append(head.strip())
        if not sep:
            return items
        rest = tail


def _strip_prefixes(target: str) -> tuple[str, str | None, bool]:
    """Remove xm/xl type prefixes (`phy:`, `file:`, `tap:aio:`, `qcow2:` ...).

    Returns (path, format or None, is_phy).
    """
    fmt: str | None = None
    phy = False
    while True:
        word, sep, rest = target.partition(":")
        word = word.lower()
        if not sep or "/" in word:
            return target, fmt, phy
        if word in _TRANSPORTS:
            phy = phy or word == "phy"
        elif word in _FORMATS:
            fmt = _FORMATS[word]
        elif word in _UNSUPPORTED_FORMATS:
            raise ValueError(f"disk format {word!r} is not supported (use raw or qcow2)")
        elif re.fullmatch(r"[a-z][a-z0-9_-]*", word):
            raise ValueError(f"disk type {word + ':'!r} is not supported "
                             "(use phy:, file:, tap:aio: or tap:qcow2:)")
        else:
            return target, fmt, phy
        target = rest


def parse_disk(spec: str, warnings: list[str] | None = None) -> DiskSpec | None:
    """One disk entry in xm (`file:/x.img,xvda,w`) or xl (`vdev=xvda, target=/x.img`) syntax.

    Throttles (`iops=`, `iops_rd=`, `iops_wr=`, `bps=`, `bps_rd=`, `bps_wr=`; bps takes
    sizes like `10M`) may follow in either syntax. Returns None for an empty CD-ROM drive
    (no media). Raises ValueError with the reason; notes go to `warnings`.
    """
    notes = warnings if warnings is not None else []
    keywords: dict[str, str] = {}
    flags: set[str] = set()
    positional: list[str] = []
    for item in _split_disk(spec):
        key, eq, value = item.partition("=")
        key = key.strip().lower().replace("-", "_") if eq else key
        if eq:
            if key in keywords:
                raise ValueError(f"{key!r} given twice")
            keywords[key] = value.strip()
        elif item.lower() in _DISK_FLAGS:
            flags.add(item.lower())
        else:
            positional.append(item)
    # Positional items: xl's `target, format, vdev, access` when the second item is a format
    # name or empty (xl's default format: `/root/image.iso,,hdc,cdrom`); otherwise xm's
    # `target, vdev, access[, backend domain]` (an empty *target* is xm's empty CD-ROM).
    names = ["target", "vdev", "access", "backend"]
    if len(positional) >= 2 and (
        positional[1].lower() in (*_FORMATS, *_UNSUPPORTED_FORMATS, "empty")
        or (positional[1] == "" and (positional[0] != "" or len(positional) == 4))
    ):
        names = ["target", "format", "vdev", "access"]
    if len(positional) > len(names):
        raise ValueError(f"too many items ({len(positional)})")
    for name, item in zip(names, positional, strict=False):
        if not item:
            continue
        if name in keywords:
            raise ValueError(f"{name!r} given twice")
        keywords[name] = item
    unknown = set(keywords) - {"target", "format", "vdev", "access", "devtype", *_THROTTLES,
                               *_DISK_IGNORED}
    if unknown:
        raise ValueError(f"unknown disk setting {sorted(unknown)[0]!r}")
    if "script" in keywords:
        notes.append(f"block script {keywords['script']!r} ignored")

    vdev = keywords.get("vdev", "")
    devtype = "cdrom" if "cdrom" in flags else "disk"
    vdev = vdev.removeprefix("ioemu:")
    vdev, _, suffix = vdev.partition(":")
    if suffix:
        if suffix not in ("cdrom", "disk"):
            raise ValueError(f"bad device type {suffix!r} (expected cdrom or disk)")
        devtype = "cdrom" if suffix == "cdrom" else devtype
    if "devtype" in keywords:
        if keywords["devtype"] not in ("cdrom", "disk"):
            raise ValueError(f"bad devtype {keywords['devtype']!r} (expected cdrom or disk)")
        devtype = keywords["devtype"]
    if not vdev:
        raise ValueError("no virtual device (vdev) given, e.g. xvda or hda")
    if not _VDEV.fullmatch(vdev):
        raise ValueError(f"bad virtual device {vdev!r} (expected e.g. xvda, hda, sdb)")

    target, prefix_fmt, phy = _strip_prefixes(keywords.get("target", "").strip())
    fmt = keywords.get("format", "").lower() or prefix_fmt or "raw"
    fmt = _FORMATS.get(fmt, fmt)
    if fmt in _UNSUPPORTED_FORMATS:
        raise ValueError(f"disk format {fmt!r} is not supported (use raw or qcow2)")
    if fmt == "empty" or not target:
        if devtype == "cdrom":
            notes.append(f"empty CD-ROM drive {vdev} left out (no media)")
            return None
        raise ValueError("no target (image file or device) given")
    if fmt not in ("raw", "qcow2"):
        raise ValueError(f"unknown disk format {fmt!r} (use raw or qcow2)")
    if phy and not target.startswith("/"):
        target = "/dev/" + target
    target = _abspath(target)

    access = keywords.get("access", "r" if devtype == "cdrom" else "w").lower()
    if access not in _ACCESS:
        raise ValueError(f"bad access mode {access!r} (expected r, ro, w or rw)")
    mode = "r" if devtype == "cdrom" else _ACCESS[access]
    if keywords.get("backend"):
        notes.append(f"disk {vdev}: backend domain {keywords['backend']!r} ignored")
    if fmt == "raw" and target.endswith(".qcow2"):
        notes.append(f"disk {vdev}: {target} looks like qcow2 but is read as raw "
                     "(use tap:qcow2: or format=qcow2)")

    throttles: dict[str, int] = {}
    for key in _THROTTLES:
        if key in keywords:
            raw = keywords[key]
            if key.startswith("bps"):
                throttles[key] = parse_bytes(raw)
            elif raw.isascii() and raw.isdigit() and 0 < int(raw) <= _MAX_IOPS:
                throttles[key] = int(raw)
            else:
                raise ValueError(f"bad {key} {raw!r} (expected a whole number 1..{_MAX_IOPS})")
    try:
        return DiskSpec.model_validate({"target": target, "vdev": vdev, "mode": mode,
                                        "format": fmt, "devtype": devtype, **throttles})
    except ValidationError as exc:  # pragma: no cover - every field was checked above
        raise ValueError(_pydantic_reason(exc)) from None


def is_xl_disk(spec: str) -> bool:
    """Whether a disk entry is in xl syntax (xm needs `TYPE:target,vdev,mode`)."""
    items = spec.split(",")
    if any("=" in item for item in items):
        return True
    first = items[0].strip()
    return bool(first) and ":" not in first


# ----- vifs --------------------------------------------------------------------------------

_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
_RATE = re.compile(r"\d+(?:\.\d+)?[GMK]?[bB](?:/s)?(?:@\d+(?:\.\d+)?[mu]?s)?")
_MODEL = re.compile(r"[A-Za-z0-9_-]{1,32}")
_VIF_IGNORED = {"type", "script", "backend", "accel", "devid", "gatewaydev", "forwarddev",
                "uuid", "trusted", "untrusted"}


def parse_vif(spec: str, warnings: list[str] | None = None) -> VifSpec:
    """One vif entry: `mac=..., bridge=..., ip=..., model=..., rate=..., pps=..., vifname=...`.

    `type=`, `script=` and other backend details are ignored silently; `''` is a default vif.
    """
    notes = warnings if warnings is not None else []
    values: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq:
            raise ValueError(f"expected key=value, got {item!r}")
        if key in values:
            raise ValueError(f"{key!r} given twice")
        if key in _VIF_IGNORED:
            continue
        if key not in VifSpec.model_fields:
            notes.append(f"unknown vif setting {key!r} ignored")
            continue
        values[key] = value
    if "mac" in values:
        mac = values["mac"].lower()
        if re.fullmatch(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}", mac) and int(mac[:2], 16) & 1:
            raise ValueError(f"MAC address {mac} is a multicast address")
    for key in ("bridge", "vifname"):
        if key in values and not _IFNAME.fullmatch(values[key]):
            raise ValueError(f"bad {key} {values[key]!r} (an interface name, up to 15 chars)")
    if "ip" in values:
        for addr in values["ip"].split():
            try:
                ipaddress.ip_interface(addr)
            except ValueError:
                raise ValueError(f"bad ip {addr!r}") from None
    if "rate" in values and not _RATE.fullmatch(values["rate"]):
        raise ValueError(f"bad rate {values['rate']!r} (expected e.g. 10Mb/s or 1MB/s@20ms)")
    if "model" in values and not _MODEL.fullmatch(values["model"]):
        raise ValueError(f"bad model {values['model']!r}")
    try:
        return VifSpec.model_validate(values)
    except ValidationError as exc:
        raise ValueError(_pydantic_reason(exc)) from None


def _pydantic_reason(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return str(err["msg"]).removeprefix("Value error, ")

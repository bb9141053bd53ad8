"""xm/xl keys for the graphical console and vCPU hotplug, read into `DisplayParams` and
`maxvcpus` (`gridvm.config.xmfile` registers these handlers).

Top-level keys: `vnc`, `vnclisten`, `vncdisplay`, `vncunused`, `vncpasswd`, `stdvga`, `vga`,
`maxvcpus`; and `vfb = [ 'vnc=1, vnclisten=…, vncdisplay=…, vncunused=…, vncpasswd=…' ]`
(xm also writes `type=vnc`). As in xl, a `vncdisplay` turns the search for a free display
off unless `vncunused` says otherwise; `stdvga = 0` means cirrus. Settings apply in file
order, so a later key wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

from pydantic import ValidationError

from gridvm.config.model import DisplayParams

VFB_IGNORED = {"keymap", "display", "xauthority", "opengl", "vkb", "serial"}
VGA_NAMES = {"stdvga": "std", "std": "std", "cirrus": "cirrus", "none": "none"}


class Reader(Protocol):
    """What these handlers use of xmfile's reader."""

    fields: dict[str, object]

    def warn(self, key: str, message: str) -> None: ...

    def bad(self, key: str, value: object, reason: str) -> NoReturn: ...


def _flag(reader: Reader, key: str, value: object) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "yes", "no", "true",
                                                            "false", "on", "off"):
        return value.strip().lower() in ("1", "yes", "true", "on")
    reader.bad(key, value, "expected 0 or 1")


def _display(reader: Reader) -> dict[str, Any]:
    got = reader.fields.setdefault("display", {})
    assert isinstance(got, dict)
    return got


def _check(reader: Reader, key: str, value: object, **kw: object) -> None:
    """Validate one display setting through the model; store it."""
    try:
        DisplayParams.model_validate(kw)
    except ValidationError as exc:
        reader.bad(key, value, str(exc.errors()[0]["msg"]).removeprefix("Value error, "))
    _display(reader).update(kw)


def _set(reader: Reader, name: str, value: object, key: str) -> None:
    """One display setting `name` (a top-level key, or an item of the vfb `key`)."""
    if name == "vnc":
        _check(reader, key, value, vnc=_flag(reader, key, value))
    elif name == "vnclisten":
        if not isinstance(value, str):
            reader.bad(key, value, "expected an IP address such as '127.0.0.1'")
        _check(reader, key, value, listen=value.strip())
    elif name == "vncdisplay":
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and re.fullmatch(r"\s*:?\d{1,5}\s*", value):
            number = int(value.strip().lstrip(":"))
        if number is None:
            reader.bad(key, value, "expected a display number (port 5900+N)")
        _check(reader, key, value, display=number)
        _display(reader).setdefault("unused", False)
    elif name == "vncunused":
        _check(reader, key, value, unused=_flag(reader, key, value))
    elif name == "vncpasswd":
        if not isinstance(value, str):
            reader.bad(key, value, "expected a string")
        if value:
            _check(reader, key, "***", password=value)
    elif name == "stdvga":
        _check(reader, key, value, vga="std" if _flag(reader, key, value) else "cirrus")
    elif name == "vga":
        if not isinstance(value, str) or value not in VGA_NAMES:
            reader.bad(key, value, "expected 'stdvga', 'cirrus' or 'none'")
        _check(reader, key, value, vga=VGA_NAMES[value])


def k_display(reader: Reader, key: str, value: object) -> None:
    _set(reader, key, value, key)


def k_vfb(reader: Reader, key: str, value: object) -> None:
    """`vfb = [ 'vnc=1, vnclisten=0.0.0.0, vncdisplay=1' ]`: the first VNC framebuffer."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        reader.bad(key, value, "expected a list of strings such as ['vnc=1']")
    if len(items) > 1:
        reader.warn(key, "only the first vfb is used")
    for item in (items[0].split(",") if items else []):
        name, eq, val = (part.strip() for part in item.partition("="))
        if not name:
            continue
        if not eq:
            reader.bad(key, value, f"expected key=value, got {item.strip()!r}")
        if name == "type":
            if val not in ("vnc", "sdl"):
                reader.bad(key, value, f"unknown vfb type {val!r} (vnc)")
            name, val = val, "1"
        if name in ("vnc", "vnclisten", "vncdisplay", "vncunused", "vncpasswd"):
            _set(reader, name, val, key)
        elif name == "sdl":
            if _flag(reader, key, val):
                reader.warn(key, "vfb sdl ignored: no local display; use vnc=1")
        elif name not in VFB_IGNORED:
            reader.warn(key, f"unknown vfb setting {name!r} ignored")


def k_maxvcpus(reader: Reader, key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        reader.bad(key, value, "expected a whole number")
    try:
        number = int(value)
    except ValueError:
        reader.bad(key, value, "expected a whole number")
    if not 1 <= number <= 64:
        reader.bad(key, value, "expected 1..64")
    reader.fields["maxvcpus"] = number


Handler = Callable[[Any, str, object], None]
HANDLERS: dict[str, Handler] = {
    **dict.fromkeys(("vnc", "vnclisten", "vncdisplay", "vncunused", "vncpasswd", "stdvga",
                     "vga"), k_display),
    "vfb": k_vfb,
    "maxvcpus": k_maxvcpus,
}

"""Read Xen xm and xl domain config files into a `DomainConfig`.

Both formats are read with the safe evaluator (`gridvm.config.safeeval`): xl files are plain
`KEY = VALUE` settings, a subset of what xm files (Python in Xen) may contain.

Format detection (`fmt="auto"`), first rule that applies:

1. the file contains anything beyond `KEY = literal` / `KEY += literal` settings (`def`,
   `if`, `xm_vars`, names, `%` or other operators, calls) -> **xm**;
2. the file name ends in `.xl`, or it sets `type` or `cmdline`, or a `disk` entry uses xl
   syntax (a `key=value` item, or a target without an xm `phy:`/`file:`/`tap:` prefix) -> **xl**;
3. otherwise -> **xm**.

`fmt="xl"` refuses files with code. The format only decides the default actions
(xm: destroy/restart/restart; xl: destroy/restart/destroy) and `source_format`; every key
spelling of either tool (`cpu_weight`/`weight`, `builder`/`type`, both disk syntaxes) is
accepted in both.

Paths: as in xm/xl, relative `kernel`, `ramdisk` and disk targets are relative to the
current directory of the reading process (not the config's directory); they are made
absolute here because the daemon runs elsewhere. `phy:NAME` without a slash means `/dev/NAME`.

Variables (`gridvm create web.cfg vmid=3`) are names visible to the file (strings as given;
`xm_vars.check()` converts them); they never become keys themselves.

Keys read: name uuid memory maxmem vcpus cpus builder type kernel ramdisk root extra cmdline
disk vif ip netmask gateway hostname dhcp on_poweroff on_reboot on_crash restart (xm's
deprecated onreboot/always/never) cpu_weight cpu_cap weight cap mem_limit serial boot ha ha_priority
ha_group hosts bootloader bootloader_args (bootargs) guest_vars, and (`gridvm.config.xmdisplay`)
maxvcpus vnc vnclisten vncdisplay vncunused vncpasswd vfb stdvga vga; a PV-GRUB `kernel`
(pv-grub-*.gz) becomes pygrub with `extra` as its menu.lst. `IGNORED_KEYS` are accepted silently
(display, firmware and platform switches QEMU decides for itself); `UNSUPPORTED_KEYS` are
ignored with a warning saying why. Any other key a file assigns and never reads gets the
warning "file:line: unknown key 'x' ignored"; names the file reads (helper variables) do not.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from gridvm.config import xmdisplay
from gridvm.config.bootargs import parse_boot_args
from gridvm.config.evalvalues import Limits
from gridvm.config.model import (
    Action,
    Actions,
    DiskSpec,
    DomainConfig,
    HaParams,
    HaPolicy,
    NetParams,
    Sched,
    VifSpec,
)
from gridvm.config.safeeval import Function, evaluate, first_code_statement, parse_source
from gridvm.config.xmkeys import IGNORED_KEYS, UNSUPPORTED_KEYS
from gridvm.config.xmvalues import (
    _abspath,
    _as_int,
    _as_str,
    _pydantic_reason,
    _str_list,
    is_xl_disk,
    normalize_cpus,
    parse_disk,
    parse_vif,
)
from gridvm.errors import ConfigError
from gridvm.files import FileRefused, read_regular

__all__ = [
    "IGNORED_KEYS",
    "KNOWN_KEYS",
    "UNSUPPORTED_KEYS",
    "Format",
    "LoadResult",
    "load_config",
    "parse_config",
    "parse_disk",
    "parse_vif",
]

Format = Literal["auto", "xm", "xl"]
M = TypeVar("M", bound=BaseModel)


@dataclass
class LoadResult:
    """A parsed config and the warnings (`file:line: ...`) to show the user."""

    config: DomainConfig
    warnings: list[str] = field(default_factory=list)


_BOOTLOADER = re.compile(r"(py|pv)-?grub|domUloader")
_PVGRUB = re.compile(r"^(pv-?grub.*|grub-.*xen.*)$")
_MAX_MIB = 16 << 20
MAX_CONFIG_BYTES = 4 * Limits().max_source  # the evaluator's limit in characters, as UTF-8
_MAX_CAP = 6400
_MAX_PRIORITY = 1_000_000
_ACTIONS: frozenset[str] = frozenset(get_args(Action))
_HA_POLICIES: frozenset[str] = frozenset(get_args(HaPolicy))
_DEFAULT_ACTIONS: Mapping[str, tuple[str, str, str]] = {
    "xm": ("destroy", "restart", "restart"),
    "xl": ("destroy", "restart", "destroy"),
}


# ----- the reader ----------------------------------------------------------------------------


class _Reader:
    """Turns the names a config file defined into DomainConfig fields."""

    def __init__(self, filename: str, fmt: str, values: Mapping[str, object],
                 lines: Mapping[str, int]) -> None:
        self.filename = filename
        self.fmt = fmt
        self.values = values
        self.lines = lines
        self.fields: dict[str, object] = {}
        self.field_key: dict[str, str] = {}
        self.actions = dict(zip(("on_poweroff", "on_reboot", "on_crash"),
                                _DEFAULT_ACTIONS[fmt], strict=True))
        self.sched: dict[str, int] = {}
        self.net: dict[str, str] = {}
        self.ha: dict[str, object] = {}
        self.warnings: list[str] = []

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.filename}:{line}" if line is not None else self.filename

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{self.where(key)}: {message}")

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(message, file=self.filename, line=self.lines.get(key))

    def bad(self, key: str, value: object, reason: str) -> NoReturn:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        self.fail(key, f"invalid {key} = {shown}: {reason}")

    def set(self, key: str, name: str, value: object) -> None:
        self.fields[name] = value
        self.field_key[name] = key

    def sub(self, key: str, model: type[M], **kw: object) -> M:
        try:
            return model.model_validate(kw)
        except ValidationError as exc:
            self.bad(key, self.values[key], _pydantic_reason(exc))

    # --- per-key handlers; each gets the key and its (non-None) value ---

    def k_str(self, key: str, value: object) -> None:
        try:
            text = _as_str(value)
        except ValueError as exc:
            self.bad(key, value, str(exc))
        if key == "name" and not text:
            self.bad(key, value, "must not be empty")
        if text:
            self.set(key, key, text)

    def k_int(self, key: str, value: object) -> None:
        try:
            number = _as_int(value)
        except ValueError as exc:
            self.bad(key, value, str(exc))
        if number < 1:
            self.bad(key, value, "must be at least 1")
        if key in ("memory", "maxmem", "mem_limit") and number > _MAX_MIB:
            self.bad(key, value, f"more than {_MAX_MIB} MiB (16 TiB)")
        self.set(key, key, number)

    def k_cpus(self, key: str, value: object) -> None:
        try:
            self.set(key, "cpus", normalize_cpus(value))
        except NotImplementedError as exc:
            self.warn(key, f"{exc}; cpus ignored")
        except ValueError as exc:
            self.bad(key, value, str(exc))

    def k_builder(self, key: str, value: object) -> None:
        if value in ("hvm", "vmx"):       # Xen 3.0.0 called HVM guests "vmx" (Intel VT)
            dtype = "hvm"
        elif value in ("linux", "generic"):
            dtype = "pv"
        else:
            self.bad(key, value, "expected 'linux' or 'hvm'")
        if "type" not in self.lines:  # xl's `type` wins over `builder`
            self.set(key, "type", dtype)

    def k_type(self, key: str, value: object) -> None:
        if not isinstance(value, str) or value not in ("pv", "pvh", "hvm"):
            self.bad(key, value, "expected 'pv', 'pvh' or 'hvm'")
        self.set(key, "type", value)

    def k_path(self, key: str, value: object) -> None:
        try:
            text = _as_str(value)
        except ValueError as exc:
            self.bad(key, value, str(exc))
        if text:
            self.set(key, key, _abspath(text))

    def k_disk(self, key: str, value: object) -> None:
        try:
            specs = _str_list(value)
        except ValueError as exc:
            self.bad(key, value, str(exc))
        disks: list[DiskSpec] = []
        for i, spec in enumerate(specs):
            notes: list[str] = []
            try:
                disk = parse_disk(spec, notes)
            except ValueError as exc:
                self.fail(key, f"invalid disk[{i}] {spec!r}: {exc}")
            for note in notes:
                self.warn(key, note)
            if disk is None:
                continue
            if any(d.vdev == disk.vdev for d in disks):
                self.fail(key, f"invalid disk[{i}] {spec!r}: device {disk.vdev} used twice")
            disks.append(disk)
        self.set(key, "disks", disks)

    def k_vif(self, key: str, value: object) -> None:
        try:
            specs = _str_list(value)
        except ValueError as exc:
            self.bad(key, value, str(exc))
        vifs: list[VifSpec] = []
        for i, spec in enumerate(specs):
            notes: list[str] = []
            try:
                vif = parse_vif(spec, notes)
            except ValueError as exc:
                self.fail(key, f"invalid vif[{i}] {spec!r}: {exc}")
            for note in notes:
                self.warn(key, note)
            if vif.mac and any(v.mac == vif.mac for v in vifs):
                self.fail(key, f"invalid vif[{i}] {spec!r}: MAC {vif.mac} used twice")
            vifs.append(vif)
        self.set(key, "vifs", vifs)

    def k_net(self, key: str, value: object) -> None:
        try:
            text = _as_str(value).strip()
            is_prefix = key == "netmask" and text.isdigit() and int(text) <= 128
            if key in ("ip", "gateway", "netmask") and text and not is_prefix:
                ipaddress.ip_address(text)
            elif key == "hostname" and text and not re.fullmatch(
                    r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", text):
                raise ValueError("expected a host name")
            elif key == "dhcp" and text not in ("", "dhcp", "off"):
                raise ValueError("expected 'dhcp' or 'off'")
        except ValueError as exc:
            self.bad(key, value, str(exc))
        if text:
            self.net[key] = text

    def k_action(self, key: str, value: object) -> None:
        if not isinstance(value, str) or value not in _ACTIONS:
            self.bad(key, value, "expected one of " + ", ".join(sorted(_ACTIONS)))
        self.actions[key] = str(value)

    def k_restart(self, key: str, value: object) -> None:
        """xm's deprecated `restart`; explicit on_poweroff/on_reboot/on_crash win."""
        presets = {"onreboot": ("destroy", "restart", "destroy"),
                   "always": ("restart", "restart", "restart"),
                   "never": ("destroy", "destroy", "destroy")}
        if not isinstance(value, str) or value not in presets:
            self.bad(key, value, "expected 'onreboot', 'always' or 'never'")
        for name, action in zip(("on_poweroff", "on_reboot", "on_crash"), presets[str(value)],
                                strict=True):
            if name not in self.lines:
                self.actions[name] = action

    def k_sched(self, key: str, value: object) -> None:
        name = key.removeprefix("cpu_")
        try:
            number = _as_int(value)
        except ValueError as exc:
            self.bad(key, value, str(exc))
        if name == "cap" and number > _MAX_CAP:
            self.bad(key, value, f"more than {_MAX_CAP} (100 per vcpu, at most 64 vcpus)")
        self.sub(key, Sched, **{name: number})
        self.sched[name] = number

    def k_serial(self, key: str, value: object) -> None:
        if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
            if len(value) > 1:
                self.warn(key, "only the first serial port is used")
            value = value[0]
        if not isinstance(value, str) or not value:
            self.bad(key, value, "expected e.g. 'pty' or 'file:/path'")
        self.set(key, "serial", value)

    def k_boot(self, key: str, value: object) -> None:
        if not isinstance(value, str) or not re.fullmatch(r"[acdn]{1,4}", value):
            self.bad(key, value, "expected boot devices from 'acdn', e.g. 'c' or 'dc'")
        self.set(key, "boot", value)

    def k_bootloader(self, key: str, value: object) -> None:
        if not isinstance(value, str):
            self.bad(key, value, "expected a path such as '/usr/bin/pygrub'")
        base = os.path.basename(value.strip())
        if not _BOOTLOADER.search(base):
            self.bad(key, value, "gridvm's boot loader is pygrub (bootloader = 'pygrub')")
        self.set(key, "bootloader", "pygrub")

    def k_bootloader_args(self, key: str, value: object) -> None:
        try:
            args = _str_list(value)
        except ValueError as exc:
            self.bad(key, value, str(exc))
        try:
            parse_boot_args(args)
        except ConfigError as exc:
            self.fail(key, str(exc))
        given = self.fields.get("bootloader_args")
        self.set(key, "bootloader_args", [*(given if isinstance(given, list) else []), *args])

    def k_guest_vars(self, key: str, value: object) -> None:
        items: dict[str, str] = {}
        pairs: list[tuple[object, object]]
        if isinstance(value, dict):
            pairs = list(value.items())
        else:
            try:
                pairs = [(v.partition("=")[0], v.partition("=")[2]) for v in _str_list(value)]
            except ValueError:
                self.bad(key, value, "expected {'NAME': 'VALUE'} or ['NAME=VALUE']")
        for name, val in pairs:
            if not isinstance(name, str) or not isinstance(val, str | int):
                self.bad(key, value, "names and values are strings")
            items[name] = str(val)
        self.set(key, "guest_vars", items)

    def k_ha(self, key: str, value: object) -> None:
        if key == "ha":
            if isinstance(value, bool | int) and value in (0, 1):
                value = "restart" if value else "off"
            if not isinstance(value, str) or value not in _HA_POLICIES:
                self.bad(key, value, "expected one of " + ", ".join(sorted(_HA_POLICIES)))
        elif key == "ha_priority":
            try:
                value = _as_int(value)
            except ValueError as exc:
                self.bad(key, value, str(exc))
            if abs(value) > _MAX_PRIORITY:
                self.bad(key, value, f"expected -{_MAX_PRIORITY}..{_MAX_PRIORITY}")
        elif key == "ha_group":
            if not isinstance(value, str):
                self.bad(key, value, "expected a string")
        elif isinstance(value, str):  # hosts
            value = [h for h in re.split(r"[\s,]+", value) if h]
        elif not isinstance(value, list | tuple) or not all(isinstance(h, str) for h in value):
            self.bad(key, value, "expected a list of host names")
        else:
            value = list(value)
        self.sub(key, HaParams, **{key: value})
        self.ha[key] = value

    # --- assembling the DomainConfig ---

    def build(self, source_file: str | None) -> DomainConfig:
        for key in sorted(self.lines, key=lambda k: self.lines[k]):
            self.read_key(key)
        dtype = self.fields.get("type", "pv")
        kernel = self.fields.get("kernel")
        if dtype == "hvm" and isinstance(kernel, str) and os.path.basename(kernel) in (
                "hvmloader", "vmxloader"):
            del self.fields["kernel"]  # xm's HVM firmware loader: SeaBIOS takes its place
        elif dtype != "hvm" and isinstance(kernel, str) and _PVGRUB.match(
                os.path.basename(kernel)):
            # PV-GRUB: a GRUB built as a PV kernel, `extra` names its menu.lst. pygrub does
            # the same job from the host.
            del self.fields["kernel"]
            self.fields.pop("ramdisk", None)
            self.fields["bootloader"] = "pygrub"
            menu = self.fields.pop("extra", None)
            if isinstance(menu, str) and menu.strip():
                given = self.fields.get("bootloader_args")
                self.fields["bootloader_args"] = [
                    *(given if isinstance(given, list) else []), f"--config={menu.strip()}"]
        if dtype == "hvm" and self.fields.get("bootloader"):
            self.warn("bootloader", "bootloader ignored: HVM domains boot from their disk "
                      "through the firmware")
            self.fields.pop("bootloader")
            self.fields.pop("bootloader_args", None)
        if "name" not in self.fields:
            raise ConfigError("missing required key 'name'", file=self.filename)
        self.fields["actions"] = self.sub_all(Actions, self.actions)
        self.fields["sched"] = self.sub_all(Sched, self.sched)
        self.fields["net"] = self.sub_all(NetParams, self.net)
        self.fields["ha"] = self.sub_all(HaParams, self.ha)
        self.fields["source_file"] = source_file
        self.fields["source_format"] = self.fmt
        try:
            return DomainConfig.model_validate(self.fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            if not err["loc"]:     # a rule across keys (e.g. vcpus above maxvcpus)
                raise ConfigError(_pydantic_reason(exc), file=self.filename) from None
            name = str(err["loc"][0])
            key = self.field_key.get(name, name)
            self.bad(key, self.fields.get(name), _pydantic_reason(exc))

    def sub_all(self, model: type[M], values: Mapping[str, object]) -> M:
        try:
            return model.model_validate(values)
        except ValidationError as exc:  # pragma: no cover - each field was checked alone
            raise ConfigError(_pydantic_reason(exc), file=self.filename) from None

    def read_key(self, key: str) -> None:
        value = self.values.get(key)
        handler = _HANDLERS.get(key)
        if handler is not None:
            if value is not None:
                handler(self, key, value)
        elif key in UNSUPPORTED_KEYS and value not in (None, "", [], 0, False):
            # (a switch turned off, such as Xen's `sdl=0`, asks for nothing)
            self.warn(key, f"{key} ignored: {UNSUPPORTED_KEYS[key]}")
        # IGNORED_KEYS are dropped silently; unknown keys are reported by _parse.


_HANDLERS: dict[str, Callable[[_Reader, str, object], None]] = {
    "name": _Reader.k_str,
    "uuid": _Reader.k_str,
    "memory": _Reader.k_int,
    "maxmem": _Reader.k_int,
    "mem_limit": _Reader.k_int,
    "vcpus": _Reader.k_int,
    "cpus": _Reader.k_cpus,
    "builder": _Reader.k_builder,
    "type": _Reader.k_type,
    "kernel": _Reader.k_path,
    "ramdisk": _Reader.k_path,
    "root": _Reader.k_str,
    "extra": _Reader.k_str,
    "cmdline": _Reader.k_str,
    "disk": _Reader.k_disk,
    "vif": _Reader.k_vif,
    **dict.fromkeys(("ip", "netmask", "gateway", "hostname", "dhcp"), _Reader.k_net),
    **dict.fromkeys(("on_poweroff", "on_reboot", "on_crash"), _Reader.k_action),
    "restart": _Reader.k_restart,
    **dict.fromkeys(("cpu_weight", "cpu_cap", "weight", "cap"), _Reader.k_sched),
    "serial": _Reader.k_serial,
    "boot": _Reader.k_boot,
    **dict.fromkeys(("ha", "ha_priority", "ha_group", "hosts"), _Reader.k_ha),
    "bootloader": _Reader.k_bootloader,
    **dict.fromkeys(("bootloader_args", "bootargs"), _Reader.k_bootloader_args),
    "guest_vars": _Reader.k_guest_vars,
    **xmdisplay.HANDLERS,
}
KNOWN_KEYS = frozenset(_HANDLERS)


def _detect_format(filename: str, has_code: bool, values: Mapping[str, object],
                   lines: Mapping[str, int]) -> Literal["xm", "xl"]:
    if has_code:
        return "xm"
    if filename.endswith(".xl") or "type" in lines or "cmdline" in lines:
        return "xl"
    disks = values.get("disk") if "disk" in lines else None
    if isinstance(disks, str):
        disks = [disks]
    if isinstance(disks, list) and any(isinstance(d, str) and is_xl_disk(d) for d in disks):
        return "xl"
    return "xm"


def _parse(text: str, filename: str, variables: Mapping[str, str] | None, fmt: Format,
           source_file: str | None) -> LoadResult:
    if fmt not in ("auto", "xm", "xl"):
        raise ConfigError(f"unknown config format {fmt!r} (expected auto, xm or xl)",
                          file=filename)
    tree = parse_source(text, filename)
    code = first_code_statement(tree)
    if fmt == "xl" and code is not None:
        raise ConfigError("xl config files hold only KEY = VALUE settings; this is Python "
                          "(read it as an xm config)", file=filename, line=code.lineno)
    result = evaluate(tree, filename, variables)
    chosen = fmt if fmt != "auto" else _detect_format(filename, code is not None,
                                                       result.values, result.lines)
    reader = _Reader(filename, chosen, result.values, result.lines)
    config = reader.build(source_file)
    warnings = reader.warnings
    for key in sorted(result.lines, key=lambda k: result.lines[k]):
        if (
            key not in KNOWN_KEYS
            and key not in IGNORED_KEYS
            and key not in UNSUPPORTED_KEYS
            and key not in result.used
            and not key.startswith("_")
            and not isinstance(result.values.get(key), Function)
        ):
            warnings.append(f"{filename}:{result.lines[key]}: unknown key {key!r} ignored")
    for name in variables or {}:
        if name not in result.used:
            warnings.append(f"{filename}: variable {name!r} was given but the config "
                            "does not use it")
    return LoadResult(config=config, warnings=warnings)


def parse_config(
    text: str,
    filename: str = "<config>",
    variables: Mapping[str, str] | None = None,
    *,
    fmt: Format = "auto",
) -> LoadResult:
    """Parse config text; `filename` is used in messages (and as `source_file` if absolute)."""
    source_file = filename if os.path.isabs(filename) else None
    return _parse(text, filename, variables, fmt, source_file)


def load_config(
    path: str | Path,
    variables: Mapping[str, str] | None = None,
    *,
    fmt: Format = "auto",
) -> LoadResult:
    """Read and parse a config file; messages name the path as given. Only regular files of
    at most MAX_CONFIG_BYTES are read (a FIFO or /dev/zero is refused before reading)."""
    shown = str(path)
    try:
        text = read_regular(Path(path), limit=MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", file=shown) from None
    except FileRefused as exc:
        raise ConfigError(f"cannot read config file: {exc}", file=shown) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file is not UTF-8 text ({exc.reason})", file=shown) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=shown) from None
    return _parse(text, shown, variables, fmt, os.path.abspath(path))

"""Image recipes: what a Debian guest image holds, as TOML read into a pydantic model.

A recipe names packages, users (SSH keys, password hashes), files, services to enable,
first-boot commands, the network (DHCP or static) and the disk size. Its hash (over the
normalized recipe, the contents of files it copies in, and the builder's own version) keys
the image cache: the same recipe is built once.

    name = "mariadb"
    release = "bookworm"
    arch = "amd64"
    disk_size = "4G"
    packages = ["mariadb-server"]
    services = ["mariadb"]
    first_boot = ["echo hello > /root/first-boot"]
    [[users]]
    name = "admin"
    ssh_keys = ["ssh-ed25519 AAAA... admin@example"]
    sudo = true
    [[files]]
    path = "/etc/motd"
    content = "managed by gridvm\\n"
    [network]
    mode = "dhcp"
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gridvm.errors import ConfigError

Arch = Literal["amd64", "i386"]
BUILDER_VERSION = 4  # bump when the build itself changes (everything is rebuilt)
KERNELS: dict[str, str] = {"amd64": "linux-image-amd64", "i386": "linux-image-686-pae"}
# What every gridvm image holds: init, the kernel's friends, the agent, SSH and the tools
# gridvm's identity script uses (dmidecode reads the SMBIOS OEM strings).
BASE_PACKAGES = (
    "systemd-sysv", "dbus", "udev", "systemd-resolved", "iproute2", "iputils-ping",
    "qemu-guest-agent", "openssh-server", "dmidecode", "sudo", "procps", "netbase",
)
RELEASES = ("bullseye", "bookworm", "trixie", "sid")

_PKG = re.compile(r"[a-z0-9][a-z0-9+.-]+(:(amd64|i386|all))?(=[A-Za-z0-9.+~:-]+)?")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_UNIT = re.compile(r"[A-Za-z0-9@_.:\\-]{1,200}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([MGT])i?B?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`4G`, `512M`, `1.5GiB` -> bytes (whole MiB)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (expected e.g. 4G or 512M)")
    mib = float(m.group(1)) * {"M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    return int(mib) * 2**20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class User(_Strict):
    """An account: SSH keys and/or a crypt(3) password hash; `sudo` adds it to group sudo."""

    name: str
    ssh_keys: list[str] = Field(default_factory=list)
    password_hash: str | None = None
    sudo: bool = False
    groups: list[str] = Field(default_factory=list)
    shell: str = "/bin/bash"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _USER.fullmatch(v):
            raise ValueError(f"invalid user name {v!r}")
        return v

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for key in v:
            if "\n" in key or not re.match(r"(ssh-|ecdsa-|sk-)\S+ \S+", key.strip()):
                raise ValueError(f"not an SSH public key: {key[:40]!r}")
        return [k.strip() for k in v]

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\$[0-9a-z]+\$[./A-Za-z0-9$=,]+|!|\*", v):
            raise ValueError("password_hash must be a crypt(3) hash such as $6$salt$... "
                             "(mkpasswd -m sha-512), or '!' for a locked password")
        return v


class FileSpec(_Strict):
    """A file put into the image: inline `content`, or `source` (relative to the recipe)."""

    path: str
    content: str | None = None
    source: str | None = None
    mode: str = "0644"
    owner: str = "root:root"

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or "\0" in v or v.endswith("/") or "/../" in v + "/":
            raise ValueError(f"file path {v!r} must be absolute, without '..'")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3,4}", v):
            raise ValueError(f"bad file mode {v!r} (octal, e.g. 0644)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> FileSpec:
        if (self.content is None) == (self.source is None):
            raise ValueError(f"file {self.path}: give exactly one of content or source")
        return self


class Network(_Strict):
    """The guest's network when gridvm passes none: DHCP, or a static address."""

    mode: Literal["dhcp", "static"] = "dhcp"
    address: str | None = Field(default=None, description="CIDR, e.g. 10.0.0.5/24")
    gateway: str | None = None
    dns: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Network:
        if self.mode == "static":
            if not self.address:
                raise ValueError("a static network needs an address (e.g. 10.0.0.5/24)")
            ipaddress.IPv4Interface(self.address)
        elif self.address:
            raise ValueError("address is only for mode = 'static'")
        for a in [*([self.gateway] if self.gateway else []), *self.dns]:
            ipaddress.ip_address(a)
        return self


class Recipe(_Strict):
    """A Debian guest image."""

    name: str = "debian"
    release: str = "bookworm"
    arch: Arch = "amd64"
    mirror: str = "http://deb.debian.org/debian"
    disk_size: str = "3G"
    hostname: str = "debian"
    kernel: str | None = Field(default=None, description="kernel package (default by arch)")
    packages: list[str] = Field(default_factory=list)
    users: list[User] = Field(default_factory=list)
    files: list[FileSpec] = Field(default_factory=list)
    services: list[str] = Field(default_factory=list)
    first_boot: list[str] = Field(default_factory=list)
    network: Network = Field(default_factory=Network)
    root_password_hash: str | None = None

    @field_validator("name")
    @classmethod
    def _image_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError(f"invalid image name {v!r}")
        return v

    @field_validator("release")
    @classmethod
    def _release(cls, v: str) -> str:
        if v not in RELEASES:
            raise ValueError(f"unknown Debian release {v!r} (known: {', '.join(RELEASES)})")
        return v

    @field_validator("disk_size")
    @classmethod
    def _size(cls, v: str) -> str:
        size = parse_size(v)
        if not 1 << 30 <= size <= 2 << 40:
            raise ValueError(f"disk_size {v} must be between 1G and 2T")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not _HOSTNAME.fullmatch(v):
            raise ValueError(f"invalid hostname {v!r}")
        return v

    @field_validator("packages")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        for p in v:
            if not _PKG.fullmatch(p):
                raise ValueError(f"invalid package name {p!r}")
        return v

    @field_validator("services")
    @classmethod
    def _services(cls, v: list[str]) -> list[str]:
        for s in v:
            if not _UNIT.fullmatch(s) or s.startswith("-"):
                raise ValueError(f"invalid service name {s!r}")
        return v

    @field_validator("root_password_hash")
    @classmethod
    def _root_hash(cls, v: str | None) -> str | None:
        return User._hash(v)

    @property
    def kernel_package(self) -> str:
        return self.kernel or KERNELS[self.arch]

    @property
    def size_bytes(self) -> int:
        return parse_size(self.disk_size)

    def all_packages(self) -> list[str]:
        """Base packages, the kernel and the recipe's own, without duplicates."""
        out: list[str] = []
        for p in (*BASE_PACKAGES, self.kernel_package, *self.packages):
            if p not in out:
                out.append(p)
        return out

    def with_overrides(self, **changes: object) -> Recipe:
        """A copy with some keys changed (CLI --release/--arch/--name), validated again."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        return Recipe.model_validate(data)


def recipe_hash(recipe: Recipe, base_dir: Path | None = None) -> str:
    """A short hash of everything that shapes the image: a change means a rebuild."""
    h = hashlib.sha256()
    h.update(f"gridvm-debian-{BUILDER_VERSION}\n".encode())
    h.update(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode())
    for f in recipe.files:
        if f.source is not None:
            h.update(f"\nsource {f.path}\n".encode())
            h.update(source_path(f, base_dir).read_bytes())
    from gridvm.provision import guestfiles  # the scripts that go into every image

    h.update(guestfiles.digest().encode())
    return h.hexdigest()[:16]


def source_path(f: FileSpec, base_dir: Path | None) -> Path:
    assert f.source is not None
    path = Path(f.source)
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if not path.is_file():
        raise ConfigError(f"file {f.path}: source {path} does not exist")
    return path


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file; errors name the file (and key)."""
    shown = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("recipe file not found", file=shown) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe: {exc}", file=shown) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=shown) from None
    recipe = parse_recipe(data, shown)
    for f in recipe.files:
        if f.source is not None:
            try:
                source_path(f, Path(path).parent)
            except ConfigError as exc:
                raise ConfigError(str(exc), file=shown) from None
    return recipe


def parse_recipe(data: dict[str, object], shown: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"{where}: {msg}" if where else msg, file=shown) from None

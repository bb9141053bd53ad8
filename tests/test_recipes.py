"""Recipes: the model, the shipped examples, their hash, and bad input (one line, nothing
left behind) — including a real mmdebstrap run that meets an unknown package."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gridvm.errors import ConfigError
from gridvm.provision.debian import build_debian
from gridvm.provision.recipe import Recipe, load_recipe, parse_recipe, recipe_hash

EXAMPLES = Path(__file__).parent.parent / "examples" / "recipes"


def test_examples_load() -> None:
    mariadb = load_recipe(EXAMPLES / "mariadb.toml")
    assert "mariadb-server" in mariadb.packages and mariadb.services == ["mariadb"]
    conf = next(f for f in mariadb.files if f.path.endswith("60-gridvm.cnf"))
    assert conf.content is not None
    for line in ("bind-address = 0.0.0.0", "log_bin", "gtid_strict_mode = ON",
                 "binlog_format = ROW"):
        assert line in conf.content
    assert any("server_id" in c for c in mariadb.first_boot)
    squid = load_recipe(EXAMPLES / "squid.toml")
    assert squid.packages == ["squid"] and squid.services == ["squid"]
    base = load_recipe(EXAMPLES / "base.toml")
    assert base == Recipe(), "base.toml shows the defaults"
    assert base.all_packages()[:3] == ["systemd-sysv", "dbus", "udev"]
    assert "qemu-guest-agent" in base.all_packages()
    assert "linux-image-686-pae" in base.with_overrides(arch="i386").all_packages()


def test_hash_follows_everything_that_shapes_the_image(tmp_path: Path) -> None:
    motd = tmp_path / "motd"
    motd.write_text("one\n")
    recipe = parse_recipe({"files": [{"path": "/etc/motd", "source": "motd"}]})
    first = recipe_hash(recipe, tmp_path)
    assert recipe_hash(recipe, tmp_path) == first
    motd.write_text("two\n")
    assert recipe_hash(recipe, tmp_path) != first, "a source file's content counts"
    assert recipe_hash(Recipe(), None) != recipe_hash(Recipe(packages=["vim"]), None)
    assert recipe_hash(Recipe(), None) != recipe_hash(Recipe(arch="i386"), None)


@pytest.mark.parametrize(("text", "message"), [
    ("nme = 'x'", r"r\.toml: nme: unknown key"),
    ("packages = ['ok', 'Bad Name']", "packages: invalid package name 'Bad Name'"),
    ("release = 'hamm'", "unknown Debian release 'hamm'"),
    ("arch = 'arm64'", "arch: Input should be 'amd64' or 'i386'"),
    ("disk_size = '10M'", "disk_size 10M must be between 1G and 2T"),
    ("[network]\nmode = 'static'", "a static network needs an address"),
    ("[network]\nmode = 'dhcp'\naddress = '10.0.0.1/24'", "only for mode = 'static'"),
    ("[[users]]\nname = 'Root Boy'", "invalid user name 'Root Boy'"),
    ("[[users]]\nname = 'a'\nssh_keys = ['hello']", "not an SSH public key"),
    ("[[users]]\nname = 'a'\npassword_hash = 'plaintext'", "crypt\\(3\\) hash"),
    ("[[files]]\npath = 'etc/x'\ncontent = ''", "must be absolute"),
    ("[[files]]\npath = '/etc/x'", "give exactly one of content or source"),
    ("[[files]]\npath = '/etc/x'\nsource = 'missing'", "source .*missing does not exist"),
    ("services = ['-x']", "invalid service name"),
    ("name = [", "not valid TOML"),
])
def test_bad_recipes_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_an_unknown_package_fails_the_build_and_leaves_nothing(tmp_path: Path) -> None:
    images = tmp_path / "images"
    recipe = Recipe(name="broken", packages=["gridvm-no-such-package"])
    started = time.monotonic()
    with pytest.raises(ConfigError, match="recipe broken: unknown package "
                       "gridvm-no-such-package in Debian bookworm/amd64") as err:
        build_debian(images, recipe)
    assert "\n" not in str(err.value)
    assert time.monotonic() - started < 300
    assert [p.name for p in images.iterdir()] == [".broken.lock"], "no image, no work dir"

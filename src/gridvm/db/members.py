"""A database member on its host: a linked clone of the MariaDB image, and what gridvm
writes into it.

A member is a managed domain on one host (`hosts = [HOST]`), `ha = "fence"`: the host's
watchdog kills it with the host's other HA domains when the host loses its lease, and it is
never restarted elsewhere (its data is on its host; the database moves its role instead).
Its MariaDB gets gridvm's settings: read-only at every start, and waiting for no
replica's acknowledgement (only the controller makes a primary writable and
semi-synchronous, AFTER_SYNC with the database's timeout); durable commits; no DNS
lookups. And gridvm's admin account, made outside the binary log.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
from typing import Any

from gridvm.config.xmfile import load_config
from gridvm.db import sql
from gridvm.errors import ConfigError, GridvmError, NotFound
from gridvm.host.manager import HostManager
from gridvm.images.store import ImageInfo, get_image
from gridvm.provision import clone as clones

CNF = "/etc/mysql/mariadb.conf.d/70-gridvm-db.cnf"


def provision(m: HostManager, record: dict[str, Any], member: str) -> clones.Made:
    """Make the member's overlay and config here (the files made, to remove on failure)."""
    spec = record["members"][member]
    s = record["settings"]
    try:
        image = get_image(m.home.images, record["image"])
    except NotFound:
        raise NotFound(f"host {spec['host']} has no image {record['image']!r} (build it "
                       "there: gridvm image build debian --recipe "
                       "examples/recipes/mariadb.toml)") from None
    if image.kind != "debian" or image.disk is None:
        raise ConfigError(f"image {image.name} is not a Debian image built from a recipe")
    if not image.template:
        image = _as_template(m, image.name)
    plan = clones.plan(member, ip=f"{spec['ip']}/{spec['prefix']}", gateway=s.get("gateway"),
                       guest_vars={"server_id": str(spec["server_id"]),
                                   "repl_password": record["secrets"]["repl"]},
                       used_macs=_macs(m))
    clones.check_free(m.home, plan)
    made = clones.Made()
    try:
        cfg = clones.make_files(m.home, image, plan[0], clones.Machine(
            memory=int(s["memory"]), bridge=str(s["bridge"])), made)
        with open(cfg, "a") as f:
            f.write(f'# a member of database {record["name"]} (gridvm db): bound to its host\n'
                    f'ha = "fence"\nhosts = [ "{spec["host"]}" ]\n')
    except BaseException:
        made.remove()
        raise
    return made


def _as_template(m: HostManager, name: str) -> ImageInfo:
    """Make the image a template (its members' disks are overlays on it). Hosts that share
    an image store (a lab's) may do it at the same moment: one of them wins."""
    with open(m.home.images / f".{name}.template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        image = get_image(m.home.images, name)
        return image if image.template else clones.mark_template(m.home.images, name)


def _macs(m: HostManager) -> set[str]:
    return {v.mac for r in m.store.all() for v in r.config.vifs if v.mac}


async def define_and_start(m: HostManager, record: dict[str, Any], member: str) -> None:
    """Provision the member here and start it; nothing is left if that fails."""
    made = provision(m, record, member)
    try:
        cfg = load_config(m.home.domain_configs / f"{member}.cfg").config
        await m.create(cfg, managed=True, start=True)
    except BaseException:
        with contextlib.suppress(GridvmError):
            await remove(m, member)
        made.remove()
        raise


async def remove(m: HostManager, member: str) -> None:
    """Destroy and forget the member's domain here, with its overlay and config."""
    with contextlib.suppress(NotFound):
        rec = m.lookup(member)
        if rec.domid is not None:
            await m.destroy(member)
        await m.delete(member)
    for path in (m.home.disks / f"{member}.qcow2", m.home.domain_configs / f"{member}.cfg"):
        path.unlink(missing_ok=True)


def cnf(record: dict[str, Any], member: str) -> str:
    """The member's server settings (read at every start of MariaDB)."""
    s = record["settings"]
    ack = s.get("ack_timeout")
    timeout = 18446744073709551615 if ack is None else int(float(ack) * 1000)
    ip = ipaddress.IPv4Address(record["members"][member]["ip"])
    return f"""# written by gridvm db: member {member} of database {record['name']}
[mysqld]
read_only = ON
skip_name_resolve = ON
sync_binlog = 1
innodb_flush_log_at_trx_commit = 1
rpl_semi_sync_master_enabled = OFF
rpl_semi_sync_slave_enabled = ON
rpl_semi_sync_master_wait_point = AFTER_SYNC
rpl_semi_sync_master_timeout = {timeout}
rpl_semi_sync_master_wait_no_slave = {'ON' if ack is None else 'OFF'}
slave_net_timeout = 4
relay_log_recovery = ON
report_host = {ip}
innodb_buffer_pool_size = 64M
"""


def setup_script(record: dict[str, Any], member: str) -> str:
    """Wait for MariaDB's first start, write gridvm's settings, restart it, and make
    gridvm's admin account (outside the binary log: every member's log starts empty)."""
    pw = record["secrets"]["admin"].replace("'", "''")
    return f"""set -e
for i in $(seq 1 240); do
    mariadb -e 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.5
done
umask 022
cat > {CNF} <<'GRIDVM_EOF'
{cnf(record, member)}GRIDVM_EOF
systemctl restart mariadb
mariadb <<'GRIDVM_EOF'
SET sql_log_bin = 0;
CREATE USER IF NOT EXISTS '{sql.ADMIN}'@'%' IDENTIFIED BY '{pw}';
GRANT ALL PRIVILEGES ON *.* TO '{sql.ADMIN}'@'%' WITH GRANT OPTION;
GRIDVM_EOF
mariadb -N -e 'SELECT @@server_id, @@read_only, @@rpl_semi_sync_master_wait_point'
"""

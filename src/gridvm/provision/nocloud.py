"""cloud-init NoCloud seeds, for clones of templates that have cloud-init in them.

A seed is an ISO 9660 volume labelled `cidata` holding `meta-data` (instance id, hostname),
`user-data` (#cloud-config) and `network-config` (version 2, matched by MAC), written by
`xorriso` from files — no mount. gridvm's own images use gridvm-identity instead (see
`clone`); a template whose image.json says `cloud_init: true` (an imported cloud image, a
recipe with the cloud-init package) gets a seed per clone as a read-only second disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gridvm.host import procs

if TYPE_CHECKING:
    from gridvm.provision.clone import CloneSpec

LABEL = "cidata"


def meta_data(spec: CloneSpec, instance_id: str) -> str:
    return f"instance-id: {instance_id}\nlocal-hostname: {spec.hostname}\n"


def user_data(spec: CloneSpec) -> str:
    lines = ["#cloud-config", f"hostname: {spec.hostname}", "preserve_hostname: false",
             "ssh_deletekeys: true"]
    if spec.guest_vars:
        body = "".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(spec.guest_vars.items()))
        lines += ["write_files:", "  - path: /etc/gridvm/identity.env",
                  "    permissions: '0644'", "    content: |"]
        lines += [f"      {line}" for line in body.splitlines()]
    return "\n".join(lines) + "\n"


def network_config(spec: CloneSpec) -> str:
    """Version 2 (netplan syntax), the first NIC matched by the clone's MAC."""
    lines = ["version: 2", "ethernets:", "  nic0:", "    match:",
             f'      macaddress: "{spec.mac}"', "    set-name: eth0"]
    if spec.address is None:
        lines.append("    dhcp4: true")
    else:
        lines += ["    dhcp4: false", f"    addresses: [{spec.address.with_prefixlen}]"]
        if spec.gateway:
            lines += ["    routes:", "      - to: 0.0.0.0/0", f"        via: {spec.gateway}"]
    return "\n".join(lines) + "\n"


def make_seed(out: Path, spec: CloneSpec, instance_id: str) -> None:
    """Write the seed ISO for one clone (Joliet + Rock Ridge, volume id `cidata`)."""
    work = Path(tempfile.mkdtemp(prefix=".seed-", dir=out.parent))
    try:
        (work / "meta-data").write_text(meta_data(spec, instance_id))
        (work / "user-data").write_text(user_data(spec))
        (work / "network-config").write_text(network_config(spec))
        procs.run(["xorriso", "-as", "mkisofs", "-quiet", "-output", str(out), "-volid", LABEL,
                   "-joliet", "-rock", str(work)], timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)

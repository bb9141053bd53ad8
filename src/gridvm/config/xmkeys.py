"""The xm/xl keys gridvm reads but does not act on: `IGNORED_KEYS` are accepted silently
(display, firmware and platform switches QEMU decides for itself); `UNSUPPORTED_KEYS` are
accepted with a warning that says what to use instead."""

from __future__ import annotations

from collections.abc import Mapping

IGNORED_KEYS = frozenset({
    # display and input settings that need no display (the console is serial)
    "display", "xauthority", "keymap", "nographic", "monitor", "vkb", "usb", "usbdevice",
    "soundhw",
    # firmware and platform switches
    "acpi", "acpi_s3", "acpi_s4", "apic", "pae", "hap", "hpet", "viridian", "timer_mode",
    "vpt_align", "localtime", "rtc_timeoffset", "tsc_mode", "nx", "firmware", "bios",
    "firmware_override", "shadow_memory", "xen_platform_pci",
    "xen_extended_power_mgmt", "pci_msitranslate", "pci_power_mgmt", "e820_host",
    "superpages", "s3_integrity", "vhpt", "guest_os_type", "max_grant_frames",
    "max_maptrack_frames", "max_event_channels", "claim_mode", "driver_domain",
    # xend-era bookkeeping
    "vif_other_config", "on_xend_start", "on_xend_stop", "description", "console", "nics",
    "blkif", "netif", "tpmif", "features",
})

_NO_PASSTHROUGH = "device passthrough is not supported"
_NO_DEVICE = "this device type is not supported"
_NO_HOTPLUG = "use maxvcpus and gridvm vcpu-set"
_NO_SPICE = "SPICE is not supported: use vnc = 1"
_OWN_QEMU = "gridvm runs and configures QEMU itself"
UNSUPPORTED_KEYS: Mapping[str, str] = {
    **dict.fromkeys(("vncviewer", "vncconsole"),
                    "no viewer is started: gridvm vnc-display DOM prints where to connect"),
    **dict.fromkeys(("sdl", "opengl"), "there is no local display: use vnc = 1"),
    "videoram": "QEMU sizes the graphics card's memory itself",
    **dict.fromkeys(
        ("spice", "spicehost", "spiceport", "spicetls_port", "spicedisable_ticketing",
         "spicepasswd", "spiceagent_mouse", "spicevdagent", "spice_clipboard_sharing",
         "spiceusbredirection"), _NO_SPICE),
    **dict.fromkeys(("device_model", "device_model_version", "device_model_override",
                     "device_model_stubdomain_override"), _OWN_QEMU),
    **dict.fromkeys(
        ("pci", "ioports", "iomem", "irqs", "dtdev", "gfx_passthru", "usbctrl", "usbdev",
         "vscsi", "rdm"), _NO_PASSTHROUGH),
    **dict.fromkeys(("vtpm", "channel", "p9", "pvcalls", "vdispl", "vsnd"), _NO_DEVICE),
    "vcpu_avail": _NO_HOTPLUG,
    "cpu": "use 'cpus' to pin a domain's CPUs",
    "snapshot": "snapshot mode is not supported",
    "cpus_soft": "soft CPU affinity is not supported; use 'cpus'",
    "cpupool": "CPU pools are not supported",
    "pool": "CPU pools are not supported",
    "vnuma": "NUMA layout is not supported",
    "on_watchdog": "this action is not supported",
    "on_soft_reset": "this action is not supported",
    "nfs_server": "NFS root is not built from nfs_server/nfs_root: put "
                  "'root=/dev/nfs nfsroot=SERVER:/PATH' in extra",
    "nfs_root": "NFS root is not built from nfs_server/nfs_root: put "
                "'root=/dev/nfs nfsroot=SERVER:/PATH' in extra",
    "cpuid": "CPU feature tuning is not supported",
    "nestedhvm": "CPU feature tuning is not supported",
    "altp2m": "CPU feature tuning is not supported",
    "device_model_args": "extra QEMU arguments are not passed on",
    "device_model_args_pv": "extra QEMU arguments are not passed on",
    "device_model_args_hvm": "extra QEMU arguments are not passed on",
    "seclabel": "security labels are not supported",
    "init_seclabel": "security labels are not supported",
    "access_control": "security labels are not supported",
}

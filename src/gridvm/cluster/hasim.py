"""The HA simulator: run a scenario against the real HA policy, without QEMU or etcd.

    python -m gridvm.cluster.hasim DIR|CMDLIST    # prints the log of the scenario

A scenario is a directory holding `cmdlist` (and `log.expect`, for tests/test_ha_scenarios.py).
Each line of a cmdlist is `TIME COMMAND ARGS...` (TIME in seconds, never decreasing; `#`
starts a comment). The clock advances in steps of `step` seconds (the HA round interval);
a command runs at the first step at or after its time, before that step's leases and rounds.

    0 settings ttl=5 margin=1 step=0.5 fence=none|power cpu-ratio=4     (first, if at all)
    0 add-host h1 h2 h3 [mem=2048] [cpus=2]
    0 add-domain web [on=h1] [ha=restart|best-effort|off] [prio=0] [group=G]
                     [hosts=h1,h2] [mem=256] [vcpus=1]          (no on=: placement picks)
   10 power-off h1 ... | power-on h1 ...     power loss (QEMUs die, the lease is not renewed)
   10 partition h1 ... | heal h1 ...         cut from the LAN (etcd and peers), still running
   10 etcd-lost h1 ... | etcd-back h1 ...    only etcd is unreachable from h1
   10 etcd-down | etcd-up                    etcd itself stops (its leases are extended when
                                             it returns, as etcd does after an election)
   10 maintenance h1 on|off
   30 crash web                              it stops and its host does not restart it
                                             (on_crash destroy, loop guard): marked lost
   10 fence-fail h1 | fence-ok h1            fencing h1 fails / works (needs fence=power)
   10 launch-fail h3 | launch-ok h3          starting a domain on h3 fails / works
   10 watchdog-fail h2 | watchdog-ok h2      h2's self-fencing kills nothing / works
   60 show                                   the cluster as the registry has it, now
  120 end                                    stop (default: 30 s after the last command)

The log has one line per event: the command, lease expiries, elections, self-fencing,
resyncs, and every decision the HA manager logs, each with its simulated time. It ends with
the state of the cluster (`show`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gridvm.cluster.hasim_world import SimHost, SimSettings, SimWorld, domain_config
from gridvm.cluster.placement import Demand, NoHostFits, loads_from, place
from gridvm.errors import ConfigError

TAIL_S = 30.0


class ScenarioError(ConfigError):
    """A cmdlist line that cannot be run; the message names the line."""


@dataclass(frozen=True)
class Command:
    at: float
    verb: str
    args: tuple[str, ...]
    line: int

    def __str__(self) -> str:
        return " ".join((self.verb, *self.args))


def parse(text: str) -> list[Command]:
    """The commands of a cmdlist, checked for known verbs and time order."""
    out: list[Command] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        try:
            at = float(words[0])
        except ValueError:
            raise ScenarioError(f"line {n}: expected a time in seconds, got {words[0]!r}") \
                from None
        if len(words) < 2 or words[1] not in VERBS:
            raise ScenarioError(f"line {n}: unknown command {' '.join(words[1:2])!r} "
                                f"(known: {', '.join(sorted(VERBS))})")
        if out and at < out[-1].at:
            raise ScenarioError(f"line {n}: time {at:g} is before {out[-1].at:g}")
        out.append(Command(at, words[1], tuple(words[2:]), n))
    return out


def options(cmd: Command, allowed: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Split a command's words into plain ones and key=value options (with defaults)."""
    plain, opts = [], dict(allowed)
    for word in cmd.args:
        key, eq, value = word.partition("=")
        if not eq:
            plain.append(word)
        elif key in allowed:
            opts[key] = value
        else:
            raise ScenarioError(f"line {cmd.line}: {cmd.verb} has no option {key!r} "
                                f"(options: {', '.join(allowed) or 'none'})")
    return plain, opts


class Simulation:
    """Runs parsed commands on a SimWorld and collects its log."""

    def __init__(self, commands: list[Command]) -> None:
        self.commands = commands
        self.world = SimWorld()
        self.stop: float | None = None

    def run(self) -> list[str]:
        world = self.world
        pending = list(self.commands)
        if pending and pending[0].verb == "settings":
            self._settings(pending.pop(0))
        last = self.commands[-1].at if self.commands else 0.0
        step = world.settings.step
        i = 0
        while True:
            world.t = round(i * step, 6)
            while pending and pending[0].at <= world.t + 1e-9:
                cmd = pending.pop(0)
                world.say("cmd", str(cmd))
                self._apply(cmd)
            if self.stop is not None or (not pending and world.t >= last + TAIL_S):
                break
            world.step()
            i += 1
        self.show()
        return world.log

    def _apply(self, cmd: Command) -> None:
        if cmd.verb == "end":
            self.stop = self.world.t
            return
        VERBS[cmd.verb](self, cmd)

    def _settings(self, cmd: Command) -> None:
        s = SimSettings()
        _, opts = options(cmd, {"ttl": str(s.ttl), "margin": str(s.margin),
                                "step": str(s.step), "fence": s.fence,
                                "cpu-ratio": str(s.cpu_ratio)})
        if opts["fence"] not in ("none", "power"):
            raise ScenarioError(f"line {cmd.line}: fence is none or power")
        self.world.settings = SimSettings(
            ttl=float(opts["ttl"]), margin=float(opts["margin"]), step=float(opts["step"]),
            fence=opts["fence"], cpu_ratio=float(opts["cpu-ratio"]))
        self.world.say("cmd", str(cmd))

    def late_settings(self, cmd: Command) -> None:
        raise ScenarioError(f"line {cmd.line}: settings must be the first command")

    def _hosts(self, cmd: Command, names: list[str] | None = None) -> list[SimHost]:
        names = list(cmd.args) if names is None else names
        if not names:
            raise ScenarioError(f"line {cmd.line}: {cmd.verb} needs a host")
        unknown = [n for n in names if n not in self.world.hosts]
        if unknown:
            raise ScenarioError(f"line {cmd.line}: unknown host {unknown[0]!r}")
        return [self.world.hosts[n] for n in names]

    # ----- commands -------------------------------------------------------------------------

    def add_host(self, cmd: Command) -> None:
        names, opts = options(cmd, {"mem": "2048", "cpus": "2"})
        for name in names:
            if name in self.world.hosts:
                raise ScenarioError(f"line {cmd.line}: host {name} exists")
            self.world.add_host(name, int(opts["mem"]), int(opts["cpus"]))

    def add_domain(self, cmd: Command) -> None:
        names, o = options(cmd, {"on": "", "ha": "restart", "prio": "0", "group": "",
                                 "hosts": "", "mem": "256", "vcpus": "1"})
        world = self.world
        if len(names) != 1 or names[0] in {c.name for c in world.configs.values()}:
            raise ScenarioError(f"line {cmd.line}: add-domain needs one new domain name")
        cfg = domain_config(names[0], memory=int(o["mem"]), vcpus=int(o["vcpus"]),
                            ha=o["ha"], priority=int(o["prio"]), group=o["group"] or None,
                            hosts=[h for h in o["hosts"].split(",") if h])
        loads = loads_from(world.host_states(), {
            n: {"cpus": h.cpus, "memory_mb": h.memory_mb}
            for n, h in world.hosts.items() if n in world.reg.alive},
            {u: r for u, (r, _) in world.reg.domains.items()})
        demand = Demand.of(cfg)
        try:
            host = place(demand, [loads[o["on"]]] if o["on"] in loads else loads.values(),
                         cpu_ratio=world.settings.cpu_ratio)
        except NoHostFits as exc:
            raise ScenarioError(f"line {cmd.line}: {exc}") from None
        if o["on"] and host.name != o["on"]:
            raise ScenarioError(f"line {cmd.line}: unknown host {o['on']!r}")
        world.start_domain(cfg, host.name)
        world.say(host.name, f"{cfg.name} started")

    def power_off(self, cmd: Command) -> None:
        for h in self._hosts(cmd):
            self.world.power_off(h)

    def power_on(self, cmd: Command) -> None:
        for h in self._hosts(cmd):
            self.world.power_on(h)

    def maintenance(self, cmd: Command) -> None:
        if len(cmd.args) != 2 or cmd.args[1] not in ("on", "off"):
            raise ScenarioError(f"line {cmd.line}: maintenance HOST on|off")
        self._hosts(cmd, [cmd.args[0]])[0].maintenance = cmd.args[1] == "on"

    def etcd(self, cmd: Command) -> None:
        world = self.world
        world.etcd_up = cmd.verb == "etcd-up"
        if world.etcd_up:                  # etcd's new leader extends every lease
            for lease in world.reg.leases:
                world.reg.leases[lease] = world.t + world.settings.ttl

    def crash(self, cmd: Command) -> None:
        world = self.world
        uuid = next((u for u, c in world.configs.items() if cmd.args == (c.name,)), None)
        if uuid is None or not any(uuid in h.running for h in world.hosts.values()):
            raise ScenarioError(f"line {cmd.line}: crash needs a running domain")
        world.crash(uuid, cmd.args[0])

    def fence_switch(self, cmd: Command) -> None:
        if self.world.settings.fence == "none":
            raise ScenarioError(f"line {cmd.line}: {cmd.verb} needs `settings fence=power`")
        for h in self._hosts(cmd):
            h.fence_ok = cmd.verb == "fence-ok"

    def show(self, _: Command | None = None) -> None:
        world = self.world
        states = world.host_states()
        held = world.reg.leader()
        world.say("show", "hosts: " + ", ".join(f"{h} {s}" for h, s in states.items())
                  + f"; HA manager: {held[0] if held else 'none'}")
        by_name = {c.name: u for u, c in world.configs.items()}
        for name, uuid in sorted(by_name.items()):
            got = world.reg.domains.get(uuid)
            where = [h.name for h in world.hosts.values() if uuid in h.running]
            reg = (f"{got[0]['state']} on {got[0]['host']}, "
                   f"{len(got[0].get('ha_restarts', []))} counted restarts"
                   if got else "not in the registry")
            world.say("show", f"{name}: {reg}; runs on {' and '.join(where) or 'no host'}")


def _host_flag(attr: str, value: bool) -> Callable[[Simulation, Command], None]:
    def apply(sim: Simulation, cmd: Command) -> None:
        for h in sim._hosts(cmd):
            setattr(h, attr, value)
    return apply


VERBS: dict[str, Callable[[Simulation, Command], None]] = {
    "settings": Simulation.late_settings,
    "add-host": Simulation.add_host,
    "add-domain": Simulation.add_domain,
    "power-off": Simulation.power_off,
    "power-on": Simulation.power_on,
    "partition": _host_flag("linked", False),
    "heal": _host_flag("linked", True),
    "etcd-lost": _host_flag("etcd_ok", False),
    "etcd-back": _host_flag("etcd_ok", True),
    "etcd-down": Simulation.etcd,
    "etcd-up": Simulation.etcd,
    "maintenance": Simulation.maintenance,
    "crash": Simulation.crash,
    "fence-fail": Simulation.fence_switch,
    "fence-ok": Simulation.fence_switch,
    "launch-fail": _host_flag("launch_ok", False),
    "launch-ok": _host_flag("launch_ok", True),
    "watchdog-fail": _host_flag("watchdog_ok", False),
    "watchdog-ok": _host_flag("watchdog_ok", True),
    "show": Simulation.show,
    "end": lambda sim, cmd: None,
}


def run_text(text: str) -> list[str]:
    """Run a cmdlist's text; the log lines."""
    return Simulation(parse(text)).run()


def run_scenario(path: Path) -> list[str]:
    """Run a scenario directory (or a cmdlist file); the log lines."""
    cmdlist = path / "cmdlist" if path.is_dir() else path
    return run_text(cmdlist.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridvm.cluster.hasim",
                                     description="Run an HA scenario; print its log.")
    parser.add_argument("scenario", type=Path, help="a scenario directory or a cmdlist file")
    args = parser.parse_args(argv)
    try:
        log = run_scenario(args.scenario)
    except (ConfigError, OSError) as exc:
        print(f"hasim: {exc}", file=sys.stderr)
        return 2
    print("\n".join(log))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

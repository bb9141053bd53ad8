"""The state machines without QEMU: a domain's lifecycle (every allowed transition, a sample
of forbidden ones, the states each verb accepts and its refusals), a migration's phases, an
incoming migration's states and a host's states."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from gridvm.cluster.hoststate import HOST, HOST_STATES, HostState, HostWatch, derive
from gridvm.cluster.placement import ACTIVE
from gridvm.errors import Conflict
from gridvm.fsm import IllegalTransition, Machine
from gridvm.host.migration_model import (
    INCOMING_STATES,
    JOB_PHASES,
    Incoming,
    IncomingState,
    Job,
    JobPhase,
    MigrateOptions,
)
from gridvm.lifecycle import (
    BUSY,
    DOMAIN,
    LIVE,
    RESIDENT,
    STOPPED,
    TRANSITIONS,
    VERBS,
    WITH_QEMU,
    DomainState,
    change,
    refusal,
    removed,
    require,
)

S = DomainState


@dataclass
class Rec:
    state: DomainState
    saved: list[DomainState] = field(default_factory=list)
    name: str = "web"


def saver(rec: Rec) -> Callable[[], None]:
    return lambda: rec.saved.append(rec.state)


# ----- the domain's transition table ---------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), DOMAIN.edges(), ids=lambda s: str(s))
def test_every_allowed_transition_is_saved_and_logged(
        old: DomainState, new: DomainState, caplog: pytest.LogCaptureFixture) -> None:
    rec = Rec(old)
    with caplog.at_level(logging.INFO, logger="gridvm.lifecycle"):
        assert change(rec, new, "because", saver(rec))
    assert rec.state is new and rec.saved == [new]
    assert f"web: {old} -> {new} (because)" in caplog.text


FORBIDDEN = [
    (S.SHUTOFF, S.RUNNING), (S.SHUTOFF, S.PAUSED), (S.SHUTOFF, S.DYING),
    (S.SHUTOFF, S.MIGRATING), (S.RUNNING, S.SHUTOFF), (S.RUNNING, S.STARTING),
    (S.RUNNING, S.INCOMING), (S.RUNNING, S.RESTORING), (S.PAUSED, S.SHUTOFF),
    (S.CRASHED, S.RUNNING), (S.CRASHED, S.PAUSED), (S.SHUTDOWN, S.RUNNING),
    (S.SHUTDOWN, S.MIGRATING), (S.MIGRATING, S.SAVING), (S.MIGRATING, S.SHUTOFF),
    (S.MIGRATING, S.CRASHED), (S.SAVING, S.MIGRATING), (S.INCOMING, S.MIGRATING),
    (S.RESTORING, S.SHUTOFF), (S.DYING, S.MIGRATING), (S.DYING, S.CRASHED),
    (S.STARTING, S.MIGRATING), (S.STARTING, S.CRASHED),
]


@pytest.mark.parametrize(("old", "new"), FORBIDDEN, ids=lambda s: str(s))
def test_forbidden_transitions_change_nothing(old: DomainState, new: DomainState) -> None:
    assert not DOMAIN.allowed(old, new)
    rec = Rec(old)
    with pytest.raises(IllegalTransition, match=f"domain web cannot go from {old} to {new}"):
        change(rec, new, "no", saver(rec))
    assert rec.state is old and rec.saved == []


def test_the_table_is_complete_and_staying_put_saves_nothing() -> None:
    assert set(TRANSITIONS) == set(DomainState)
    assert WITH_QEMU == set(DomainState) - {S.SHUTOFF} == RESIDENT | BUSY
    assert not LIVE & STOPPED and not RESIDENT & BUSY
    rec = Rec(S.RUNNING)
    assert not change(rec, S.RUNNING, "again", saver(rec))
    assert rec.saved == []


def test_a_failed_save_leaves_the_state_as_it_was() -> None:
    rec = Rec(S.RUNNING)

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        change(rec, S.PAUSED, "pause", fail)
    assert rec.state is S.RUNNING


def test_only_a_stopped_record_is_removed() -> None:
    removed(Rec(S.SHUTOFF), "delete")
    removed(Rec(S.DYING), "destroy")
    with pytest.raises(IllegalTransition, match="cannot be removed while running"):
        removed(Rec(S.RUNNING), "delete")


def test_registry_counts_every_state_with_a_qemu_as_active() -> None:
    assert set(ACTIVE) == {str(s) for s in WITH_QEMU} | {"restarting"}


# ----- the states each verb accepts ------------------------------------------------------------


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_accepts_its_states_and_refuses_the_others(verb: str) -> None:
    for state in DomainState:
        if state in VERBS[verb]:
            require(verb, "web", state)
        else:
            with pytest.raises(Conflict) as err:
                require(verb, "web", state)
            assert str(err.value) == refusal(verb, "web", state)
            assert str(err.value).startswith("domain web is ")


def test_refusals_name_the_state() -> None:
    assert refusal("destroy", "web", S.MIGRATING) == \
        "domain web is migrating; try again when it is done"
    assert refusal("pause", "web", S.SAVING) == \
        "domain web is being saved; try again when it is done"
    assert refusal("migrate", "web", S.INCOMING) == \
        "domain web is migrating here; try again when it is done"
    assert refusal("pause", "web", S.SHUTOFF) == "domain web is not running"
    assert refusal("unpause", "web", S.CRASHED) == "domain web is crashed; destroy it first"
    assert refusal("start", "web", S.PAUSED) == "domain web is already running"
    assert refusal("delete", "web", S.RUNNING) == \
        "domain web is running; shut it down or destroy it first"
    for state in BUSY:    # nothing but waiting while an operation owns the domain
        assert all(state not in accepted for accepted in VERBS.values())
    assert VERBS["destroy"] == RESIDENT and VERBS["migrate"] == LIVE


# ----- migrations ------------------------------------------------------------------------------


def job() -> Job:
    return Job("m1", "web", "u1", "10.0.0.2:8002", MigrateOptions())


def test_a_migration_goes_through_its_phases_in_order(caplog: pytest.LogCaptureFixture) -> None:
    j = job()
    path = [JobPhase.PREPARING, JobPhase.STORAGE, JobPhase.MEMORY, JobPhase.SWITCHOVER,
            JobPhase.SWITCHED, JobPhase.COMPLETED]
    with caplog.at_level(logging.INFO, logger="gridvm.migration"):
        for phase in path:
            j.set_phase(phase, "next")
    assert j.phase is JobPhase.COMPLETED and j.view()["phase"] == "completed"
    assert "web migration m1: switchover -> switched (next)" in caplog.text
    assert set(JOB_PHASES) == set(JobPhase)
    for end in (JobPhase.COMPLETED, JobPhase.FAILED, JobPhase.CANCELLED):
        assert JOB_PHASES[end] == set()


@pytest.mark.parametrize(("old", "new"), [
    (JobPhase.MEMORY, JobPhase.STORAGE), (JobPhase.SWITCHED, JobPhase.MEMORY),
    (JobPhase.COMPLETED, JobPhase.FAILED), (JobPhase.FAILED, JobPhase.COMPLETED),
    (JobPhase.STARTING, JobPhase.COMPLETED), (JobPhase.PREPARING, JobPhase.SWITCHOVER)])
def test_a_migration_never_goes_back_or_skips_to_completed(old: JobPhase,
                                                           new: JobPhase) -> None:
    j = job()
    j.phase = old
    with pytest.raises(IllegalTransition):
        j.set_phase(new, "no")
    assert j.phase is old


def test_an_incoming_migration_ends_once() -> None:
    inc = Incoming("m1", "u1", "web", "h1:/home", False, False, None, 0.0)
    inc.set_state(IncomingState.RUNNING, "arrived")
    assert inc.view().state == "running"
    with pytest.raises(IllegalTransition):
        inc.set_state(IncomingState.FAILED, "too late")
    assert INCOMING_STATES[IncomingState.WAITING] == {
        IncomingState.RUNNING, IncomingState.PAUSED, IncomingState.FAILED}


# ----- hosts -----------------------------------------------------------------------------------


def test_host_state_derivation() -> None:
    assert derive(fenced=True, alive=True, maintenance=True) is HostState.FENCED
    assert derive(fenced=False, alive=False, maintenance=True) is HostState.DOWN
    assert derive(fenced=False, alive=True, maintenance=True) is HostState.MAINTENANCE
    assert derive(fenced=False, alive=True, maintenance=False) is HostState.UP
    assert set(HOST_STATES) == set(HostState)
    assert not HOST.allowed(HostState.FENCED, HostState.DOWN)


def test_the_host_watch_logs_each_transition(caplog: pytest.LogCaptureFixture) -> None:
    watch = HostWatch()
    with caplog.at_level(logging.INFO, logger="gridvm.cluster.hosts"):
        for states in ({"h1": "up", "h2": "up"}, {"h1": "up", "h2": "down"},
                       {"h1": "up", "h2": "fenced"}, {"h1": "maintenance", "h2": "up"},
                       {"h1": "up"}, {"h1": "fenced"}, {"h1": "down"}):
            watch.observe(states)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "host h1: up (first seen)", "host h2: up (first seen)",
        "host h2: up -> down (lease expired)", "host h2: down -> fenced (fenced)",
        "host h1: up -> maintenance (maintenance on)", "host h2: fenced -> up (back)",
        "host h1: maintenance -> up (maintenance off)", "host h2: removed from the cluster",
        "host h1: up -> fenced (fenced)",
        "host h1: fenced -> down, a transition the table does not list"]


def test_a_machine_needs_a_row_for_every_state() -> None:
    class Two(enum.StrEnum):
        A = "a"
        B = "b"

    with pytest.raises(ValueError, match="no row"):
        Machine("two", {Two.A: {Two.B}}, logging.getLogger("t"))

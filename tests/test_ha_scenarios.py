"""HA scenarios under the simulator (no QEMU, no etcd): each tests/ha_scenarios/<name>/cmdlist
must produce exactly its log.expect. `GRIDVM_HA_UPDATE=1` rewrites the expectations instead
(review the diff before committing it)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from gridvm.cluster.hasim import ScenarioError, run_scenario, run_text

SCENARIOS = Path(__file__).parent / "ha_scenarios"
NAMES = sorted(p.name for p in SCENARIOS.iterdir() if (p / "cmdlist").exists())


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name: str) -> None:
    got = "\n".join(run_scenario(SCENARIOS / name)) + "\n"
    expect_file = SCENARIOS / name / "log.expect"
    if os.environ.get("GRIDVM_HA_UPDATE") == "1":
        expect_file.write_text(got)
        return
    expect = expect_file.read_text() if expect_file.exists() else ""
    if got != expect:
        diff = "".join(difflib.unified_diff(expect.splitlines(keepends=True),
                                            got.splitlines(keepends=True),
                                            "log.expect", "produced"))
        pytest.fail(f"scenario {name}: the log differs from log.expect\n{diff}", pytrace=False)


def test_at_least_thirty_scenarios() -> None:
    assert len(NAMES) >= 30


def test_no_scenario_runs_a_domain_twice() -> None:
    for name in NAMES:
        assert "CHECK" not in (SCENARIOS / name / "log.expect").read_text(), name


@pytest.mark.parametrize("text, error", [
    ("0 add-host h1\nx crash web\n", "line 2: expected a time"),
    ("0 add-host h1\n0 frobnicate h1\n", "line 2: unknown command 'frobnicate'"),
    ("5 add-host h1\n1 power-off h1\n", "line 2: time 1 is before 5"),
    ("0 add-host h1\n0 power-off h9\n", "line 2: unknown host 'h9'"),
    ("0 add-host h1\n0 add-domain web mem=9999\n", "line 2: no host fits domain web"),
    ("0 add-host h1\n0 add-domain web colour=red\n", "line 2: add-domain has no option"),
    ("0 add-host h1\n1 fence-fail h1\n", "line 2: fence-fail needs `settings fence=power`"),
    ("0 add-host h1\n1 settings ttl=3\n", "line 2: settings must be the first command"),
    ("0 add-host h1\n1 crash web\n", "line 2: crash needs a running domain"),
])
def test_bad_cmdlist_names_the_line(text: str, error: str) -> None:
    with pytest.raises(ScenarioError, match=error):
        run_text(text)

"""The committed Prefect automations parse as Prefect's own schema and say what the docs say."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ZOMBIES = REPO / "flows" / "automations" / "crash-zombies.json"


def test_the_zombie_automation_is_a_valid_proactive_heartbeat_trigger_that_crashes_the_run():
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    auto = AutomationCore.model_validate(json.loads(ZOMBIES.read_text()))
    trigger = auto.trigger
    assert isinstance(trigger, EventTrigger) and trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    # every way a healthy run can go on or end stops the countdown; nothing else does
    assert trigger.expect == {
        "prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed",
    }  # fmt: skip
    assert trigger.for_each == {"prefect.resource.id"} and trigger.threshold == 1
    # three missed 30 s heartbeats, the frequency the docs start workers with
    assert trigger.within.total_seconds() == 90
    (action,) = auto.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    ops = (REPO / "docs" / "operations.md").read_text()
    assert "flows/automations/crash-zombies.json" in ops and "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30" in ops

"""``switchboard canary status|promote|rollback|pause|resume [NAME]``: see and steer experiments.

The state comes from the control topic (what every router applies); the recent decisions from
switchboard.decisions. An operator's action is published like the controller's: a new state on
the control topic and a decision (``by`` operator) on the decisions topic. The running
controller reads the new state and carries on from it (a paused experiment it leaves alone).

Where the broker is: the running `switchboard up` (its run/stack.json), else
``SWITCHBOARD_KAFKA_BOOTSTRAP``. The routing config: ``SWITCHBOARD_CONFIG``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from schemas.control import Action, ExperimentState
from schemas.topics import DECISIONS_TABLE
from services.common import fences
from services.common.config_watch import in_force, newest_applied
from services.common.control import ControlReader, share_in_force
from services.common.kafka import ProducerPublisher
from services.common.routing_config import ConfigError, Experiment, LoadedConfig, load_config
from services.common.settings import CommonSettings
from services.controller.domain import NotAllowed, next_state, operate, starting_state
from services.controller.service import announce
from services.metrics.config import MetricsSettings
from switchboard.analyst import QueryFailed, format_table, run_query, stack_file

OPERATOR = "operator"
RECENT_DECISIONS = 8


@dataclass(frozen=True)
class Location:
    bootstrap: str
    config: Path
    run_dir: Path | None  # the embedded stack's, for its fences (None: no stack here)


def locate(settings: MetricsSettings) -> Location:
    """The broker and the routing config: the running `switchboard up`'s, else the settings'
    (``SWITCHBOARD_CONFIG`` wins over the stack's config when it is set)."""
    path = stack_file(settings.data_dir)
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("kafka_bootstrap"):
            config = settings.config
            if "config" not in settings.model_fields_set and state.get("config"):
                config = Path(state["config"])
            return Location(state["kafka_bootstrap"], config, path.parent)
    return Location(settings.kafka_bootstrap, settings.config, None)


async def _states(bootstrap: str, topic: str) -> dict[str, ExperimentState]:
    reader = ControlReader(bootstrap, topic, "switchboard-canary")
    await reader.start(catch_up_s=15)
    try:
        return dict(reader.states)
    finally:
        await reader.stop()


def _state_line(experiment: Experiment, state: ExperimentState | None) -> list[Any]:
    spec = experiment.spec
    steps = " → ".join(f"{s:g}" for s in spec.steps) if spec.mode == "canary" else "(shadow)"
    if state is None or state.candidate != experiment.candidate:
        return [experiment.name, spec.tier, experiment.candidate, spec.start_share, "not started",
                steps, "", "the controller has not published a state yet", ""]  # fmt: skip
    since = state.since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return [experiment.name, spec.tier, experiment.candidate, share_in_force(experiment, state),
            state.status, steps, since, state.reason, state.by]  # fmt: skip


def _print_status(config: LoadedConfig, states: dict[str, ExperimentState], name: str | None,
                  settings: MetricsSettings) -> int:  # fmt: skip
    chosen = [e for e in config.experiments.values() if name is None or e.name == name]
    columns = ["experiment", "tier", "candidate", "share_pct", "status", "steps", "since",
               "reason", "by"]  # fmt: skip
    print(format_table(columns, [_state_line(e, states.get(e.name)) for e in chosen]))
    where = f" WHERE experiment = '{name}'" if name else ""
    sql = (
        "SELECT decided_at, experiment, action, share_from, share_to, by, reason"
        f" FROM {settings.clickhouse_database}.{DECISIONS_TABLE}{where}"
        f" ORDER BY decided_at DESC LIMIT {RECENT_DECISIONS}"
    )
    try:
        columns, rows = run_query(sql, settings)
    except QueryFailed as exc:
        print(f"\n(recent decisions unavailable: {exc})")
        return 0
    print(
        f'\nrecent decisions (newest first; all of them: switchboard sql "{sql.split(" ORDER")[0]}"):'
    )
    print(format_table(columns, rows))
    return 0


async def _act(config: LoadedConfig, experiment: Experiment, action: Action, bootstrap: str,
               run_dir: Path | None, settings: CommonSettings) -> str:  # fmt: skip
    topics = settings.topics
    states = await _states(bootstrap, topics.control)
    state = states.get(experiment.name)
    now = datetime.now(UTC)
    if state is None or state.candidate != experiment.candidate:
        state = starting_state(experiment, OPERATOR, now)
    verdict = operate(experiment, state, action)
    after = next_state(state, verdict, OPERATOR, now)
    holds = fences.for_process(run_dir, run_dir is not None, "canary-cli")
    publisher = ProducerPublisher(bootstrap, "switchboard-canary", holds)
    if holds is not None:
        await holds.start()
    await publisher.start()
    try:
        await announce(publisher, topics, experiment, state, after, verdict, config.hash, OPERATOR)
    finally:
        await publisher.stop()
        if holds is not None:
            await holds.stop()
    return f"{experiment.name}: {verdict.action} {state.share_pct:g}% → {after.share_pct:g}% ({after.status})"


def canary_command(action: str, name: str | None) -> int:
    settings = MetricsSettings()
    where = locate(settings)
    try:
        config = load_config(where.config)
    except ConfigError as exc:
        print(f"canary: {exc}", file=sys.stderr)
        return 2
    try:  # the fleet serves what `switchboard config apply` gave it last, if newer than the file
        applied = asyncio.run(
            newest_applied(where.bootstrap, settings.topics.config, "switchboard-canary")
        )
    except (OSError, KafkaError) as exc:
        print(f"canary: cannot reach Kafka at {where.bootstrap}: {exc}", file=sys.stderr)
        return 1
    config = in_force(config, applied)
    if not config.experiments:
        print(
            f"canary: {config.path} runs no experiment (see docs/experiments.md)", file=sys.stderr
        )
        return 2
    if name is not None and name not in config.experiments:
        known = ", ".join(config.experiments)
        print(f"canary: no experiment {name!r} in {config.path}; it has: {known}", file=sys.stderr)
        return 2
    bootstrap, run_dir = where.bootstrap, where.run_dir
    try:
        if action == "status":
            states = asyncio.run(_states(bootstrap, settings.topics.control))
            return _print_status(config, states, name, settings)
        if name is None:
            print(f"canary {action}: name the experiment", file=sys.stderr)
            return 2
        experiment = config.experiments[name]
        print(asyncio.run(_act(config, experiment, action, bootstrap, run_dir, settings)))  # type: ignore[arg-type]
    except NotAllowed as exc:
        print(f"canary {action}: {exc}", file=sys.stderr)
        return 1
    except (OSError, KafkaError) as exc:  # the broker is not there
        print(f"canary: cannot reach Kafka at {bootstrap}: {exc}", file=sys.stderr)
        return 1
    return 0

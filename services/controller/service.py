"""The controller's loop: every experiment whose interval is due is judged on its window, and the
verdict goes out as a new state (control topic) when it changes anything, and as a decision
(decisions topic → switchboard.decisions) every time.

Only the active instance acts (``Leadership``); a standby reads the control topic like a router
does, so it takes over from the newest state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from schemas.control import ControlDecision, ExperimentState
from schemas.topics import Topics
from services.common.control import publish_state
from services.common.kafka import Publisher
from services.common.routing_config import Experiment, LoadedConfig
from services.controller.adapters.figures import Figures, FiguresUnavailable
from services.controller.domain import Verdict, judge, next_state, starting_state

log = logging.getLogger("switchboard.controller")


def decision(
    experiment: Experiment,
    before: ExperimentState | None,
    verdict: Verdict,
    by: str,
    config_hash: str,
    now: datetime,
) -> ControlDecision:
    return ControlDecision(
        decided_at=now,
        experiment=experiment.name,
        tier=experiment.spec.tier,
        candidate=experiment.candidate,
        action=verdict.action,
        share_from=before.share_pct if before is not None else 0.0,
        share_to=verdict.share_to,
        reason=verdict.reason[:4000],
        criteria=verdict.criteria,
        figures=verdict.figures,
        by=by,
        config_hash=config_hash,
    )


async def announce(
    publisher: Publisher,
    topics: Topics,
    experiment: Experiment,
    before: ExperimentState | None,
    after: ExperimentState | None,
    verdict: Verdict,
    config_hash: str,
    by: str,
) -> ControlDecision:
    """Publish the new state (if any) and the decision; the state first, so a decision on record
    is one in force."""
    now = datetime.now(UTC)
    if after is not None:
        await publish_state(publisher, topics.control, after)
    record = decision(experiment, before, verdict, by, config_hash, now)
    await publisher.publish(topics.decisions, record, key=experiment.name)
    return record


class Controller:
    def __init__(
        self,
        config: LoadedConfig,
        topics: Topics,
        publisher: Publisher,
        figures: Figures,
        states: dict[str, ExperimentState],
        apply: Callable[[ExperimentState], None],
        name: str,
    ) -> None:
        self.config = config
        self.topics = topics
        self.publisher = publisher
        self.figures = figures
        self.states = states  # the control topic's, kept current by a ControlReader
        self.apply = apply  # a state this instance published counts before it is read back
        self.name = name
        self._judged: dict[str, float] = {}  # monotonic time of each experiment's last verdict
        self.decisions = 0

    def state_of(self, experiment: Experiment) -> ExperimentState | None:
        state = self.states.get(experiment.name)
        return state if state is not None and state.candidate == experiment.candidate else None

    async def tick(self) -> None:
        for experiment in self.config.experiments.values():
            try:
                await self._one(experiment)
            except FiguresUnavailable as exc:
                log.warning("%s: no figures this time (%s); holding", experiment.name, exc)

    async def _one(self, experiment: Experiment) -> None:
        now = datetime.now(UTC)
        state = self.state_of(experiment)
        if state is None:
            started = starting_state(experiment, self.name, now)
            verdict = Verdict(
                "start", started.share_pct, started.step, started.status, started.reason
            )
            await self._publish(experiment, None, started, verdict)
            self._judged[experiment.name] = time.monotonic()
            return
        last = self._judged.get(experiment.name)
        if last is not None and time.monotonic() - last < experiment.spec.interval_s:
            return
        self._judged[experiment.name] = time.monotonic()
        if experiment.spec.mode != "canary":
            return  # a shadow has nothing to promote: its comparisons are for people to read
        if state.status == "rolled_back" or state.share_pct <= 0:
            return  # an operator promotes it next (a paused one is still watched for breaches)
        window = await self.figures.window(
            experiment.name, experiment.candidate, state.share_pct, state.since
        )
        verdict = judge(experiment, state, window)
        after = (
            None
            if verdict.action == "hold" and verdict.status == state.status
            else (next_state(state, verdict, self.name, now))
        )
        await self._publish(experiment, state, after, verdict)

    async def _publish(
        self,
        experiment: Experiment,
        before: ExperimentState | None,
        after: ExperimentState | None,
        verdict: Verdict,
    ) -> None:
        record = await announce(
            self.publisher,
            self.topics,
            experiment,
            before,
            after,
            verdict,
            self.config.hash,
            self.name,
        )
        if after is not None:
            self.apply(after)
        self.decisions += 1
        level = logging.DEBUG if record.action == "hold" else logging.INFO
        log.log(
            level,
            "%s: %s %.4g%% → %.4g%%: %s",
            experiment.name,
            record.action,
            record.share_from,
            record.share_to,
            record.reason,
        )

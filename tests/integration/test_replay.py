"""`switchboard replay` on the real broker, chDB and the provider SIMULATOR: answered requests,
captured (redacted) or still on the tier topic only, sent again through the shadow worker to a
model or to where another config routes them, compared with the originals in llm_shadow, and
reported per slice. The CLI runs as a user runs it, in its own process, finding the stack by its
data directory's run/stack.json."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.shadow.app import ShadowApp
from services.shadow.config import ShadowSettings
from switchboard.embedded import free_port
from tests.integration.stack import API_KEY, Infra, Stack, wait_until, within

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
tiers:
  fast:
    interactive: true
    timeout_s: 10
    models:
      - {{model: openai/sim-light, name: sim-light, api_base: "{sim}/v1", price_as: gpt-4o-mini}}
      - {{model: openai/sim-balanced, name: sim-balanced, api_base: "{sim}/v1",
          price_as: gpt-4.1-mini}}
default: fast
capture:
  tenants: [acme]
"""
# another routing: long prompts to a reasoning tier, the rest to sim-balanced
OTHER = """
tiers:
  quick:
    models:
      - {{model: openai/sim-balanced, name: sim-balanced, api_base: "{sim}/v1",
          price_as: gpt-4.1-mini}}
  deep:
    models:
      - {{model: openai/sim-reasoning, name: sim-reasoning, api_base: "{sim}/v1", price_as: o3}}
rules:
  - {{name: long, when: "message_count >= 8", tier: deep}}
default: quick
"""


@pytest.fixture
async def stack(infra: Infra) -> AsyncIterator[tuple[Stack, dict[str, str]]]:
    path = infra.config(CONFIG.format(sim=infra.simulator_url))
    port = free_port()
    async with infra.stack(path, ["fast"], metrics_port=port) as running:
        app = ShadowApp(ShadowSettings(**infra.settings(path)))
        await within(60, "the shadow worker to start", app.start())
        try:
            await within(60, "the shadow worker to join", app.wait_assigned())
            # where a user's shell finds the stack: <data dir>/run/stack.json
            data_dir = infra.tmp_path / "data"
            (data_dir / "run").mkdir(parents=True)
            state = {
                "kafka_bootstrap": infra.bootstrap,
                "metrics_url": f"http://127.0.0.1:{port}",
                "config": str(path),
            }
            (data_dir / "run" / "stack.json").write_text(json.dumps(state))
            env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
            env.update(SWITCHBOARD_DATA_DIR=str(data_dir), SWITCHBOARD_TOPIC_PREFIX=infra.prefix)
            yield running, env
        finally:
            await within(30, "the shadow worker to stop", app.stop())


async def switchboard(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "switchboard.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 180)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def ask(stack: Stack, tenant: str, messages: list[dict[str, Any]]) -> str:
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"model": "fast", "messages": messages, "metadata": {"tenant": tenant}}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=30) as http:
        resp = await http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-switchboard-request-id"]


async def rows(stack: Stack, sql: str, at_least: int) -> list[list[Any]] | None:
    found = (await stack.metrics.store.query(sql))[1]
    return found if len(found) >= at_least else None


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_a_replay_compares_captured_and_kafka_held_requests_per_slice(
    stack: tuple[Stack, dict[str, str]], tmp_path: Path, simulator_url: str
) -> None:
    running, env = stack
    started = datetime.now(UTC) - timedelta(seconds=1)
    conversation = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(9)
    ]
    captured = [await ask(running, "acme", user(f"Where is parcel {i}? jane@example.com"))
                for i in range(5)]  # fmt: skip
    captured.append(await ask(running, "acme", conversation))
    captured.append(await ask(running, "acme", user("HELP!!!!!!!!!!!! where is it")))
    held = [await ask(running, "globex", user(f"Refund order {i}")) for i in range(2)]
    ours = captured + held
    quoted = ", ".join(f"'{i}'" for i in ours)
    await wait_until(  # the originals' rows: events for all, inputs and outputs for acme's
        lambda: rows(
            running,
            f"SELECT DISTINCT request_id FROM switchboard.llm_events WHERE request_id IN ({quoted})",
            len(ours),
        ),
        60,
        "the originals' events",
    )
    await wait_until(
        lambda: rows(
            running,
            "SELECT request_id FROM switchboard.llm_payloads WHERE kind = 'output'"
            f" AND request_id IN ({quoted})",
            len(captured),
        ),
        60,
        "the captured answers",
    )
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join([*ours, "never-seen"]) + "\n")

    # against a model of the config: by id, captured and Kafka-held alike
    code, out, err = await switchboard(
        env, "replay", "--request-ids", str(ids), "--against", "sim-balanced",
        "--rate", "50", "--run", "by-id", "--wait-s", "60",
    )  # fmt: skip
    assert code == 0, out + err
    print(out)  # shown with -s: what a user sees
    assert "9 requests (7 captured, 2 still on the tier topics)" in out, out
    assert "1 request ids found nowhere, not replayed: never-seen" in out, out
    # progress on stderr; in a pipe, plain lines, the last one at the end
    assert err.splitlines()[-1].startswith("replay: sent 9/9, compared 9/9, "), err
    report = {
        line.split()[0]: line for line in out.splitlines() if line.startswith(("all", "short"))
    }
    assert report["all"].split()[1:3] == ["9", "9"], out  # requests, compared
    for line in ("long conversation", "noisy or truncated"):
        assert any(row.startswith(line) for row in out.splitlines()), (line, out)

    compared = await rows(
        running,
        "SELECT request_id, outcome, baseline_model, candidate_model, baseline_status,"
        " isNotNull(similarity), slices FROM switchboard.llm_shadow FINAL"
        " WHERE experiment = 'replay-by-id' ORDER BY request_id",
        9,
    )
    assert compared is not None and sorted(r[0] for r in compared) == sorted(ours)
    by_id = {r[0]: r for r in compared}
    for rid in ours:
        assert by_id[rid][1:5] == ["compared", "sim-light", "sim-balanced", "ok"], by_id[rid]
        # similarity needs the original answer's text: captured for acme only
        assert bool(by_id[rid][5]) is (rid in captured), by_id[rid]
    assert "long conversation" in by_id[captured[5]][6]
    assert "noisy or truncated" in by_id[captured[6]][6]
    # the candidate's calls are llm_events rows of their own, beside the originals
    events = await rows(
        running,
        "SELECT variant, model, count() FROM switchboard.llm_events"
        f" WHERE request_id IN ({quoted}) GROUP BY variant, model ORDER BY variant",
        2,
    )
    assert events == [["", "sim-light", 9], ["shadow", "sim-balanced", 9]], events

    # against another config, by time: each request goes where that config routes it
    other = tmp_path / "other.yaml"
    other.write_text(OTHER.format(sim=simulator_url))
    code, out, err = await switchboard(
        env, "replay", "--since", started.isoformat(), "--against", str(other),
        "--captured-only", "--rate", "50", "--run", "by-time", "--wait-s", "60",
    )  # fmt: skip
    assert code == 0, out + err
    assert "7 requests (7 captured, 0 still on the tier topics)" in out, out
    models = await rows(
        running,
        "SELECT request_id, candidate_model FROM switchboard.llm_shadow FINAL"
        " WHERE experiment = 'replay-by-time'",
        7,
    )
    assert models is not None
    assert {r[0]: r[1] for r in models} == {
        rid: "sim-reasoning" if rid == captured[5] else "sim-balanced" for rid in captured
    }

    # a bounded replay takes the oldest; a run's name is not taken twice
    code, out, err = await switchboard(
        env, "replay", "--request-ids", str(ids), "--against", "fast", "--captured-only",
        "--limit", "3", "--rate", "50", "--run", "bounded", "--wait-s", "60",
    )  # fmt: skip
    assert code == 0, out + err
    assert "3 requests (3 captured" in out and "--limit 3 reached" in out, out
    assert "found nowhere" not in out and "not captured" not in out, out  # past the limit
    code, _, err = await switchboard(
        env, "replay", "--request-ids", str(ids), "--against", "fast", "--run", "bounded"
    )
    assert code == 2 and "--run bounded: that run has comparisons already" in err, err

    # the report again, later, as JSON
    code, out, err = await switchboard(env, "replay", "report", "by-time", "--format", "json")
    assert code == 0, err
    slices = {r["slice"]: r for r in json.loads(out)}
    assert slices["all"]["requests"] == 7 and slices["all"]["cand_p95_ms"] > 0
    assert slices["all"]["cand_cost_per_1k"] > 0 and isinstance(slices["all"]["flags"], list)
    code, _, err = await switchboard(env, "replay", "report", "nosuch-run")
    assert code == 1 and "no comparison for run 'nosuch-run'" in err, err


def test_bad_arguments_are_refused_by_name(
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In this process (no stack needed: the arguments are refused before anything is sent)."""
    from switchboard.cli import main

    config = tmp_path / "routing.yaml"
    config.write_text(CONFIG.format(sim="http://127.0.0.1:9"))
    monkeypatch.setenv("SWITCHBOARD_DATA_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setenv("SWITCHBOARD_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("SWITCHBOARD_TOPIC_PREFIX", topic_prefix)
    monkeypatch.setenv("SWITCHBOARD_CONFIG", str(config))
    monkeypatch.setenv("SWITCHBOARD_CLICKHOUSE_URL", "http://127.0.0.1:9")  # never asked

    def refused(*args: str) -> str:
        assert main(["replay", *args]) == 2
        return capsys.readouterr().err

    err = refused("--since", "1h", "--against", "gpt-9")
    assert "--against 'gpt-9'" in err and "sim-balanced" in err and "fast" in err, err
    err = refused("--against", "fast")
    assert "--since" in err and "--request-ids" in err, err
    err = refused("--since", "soon", "--against", "fast")
    assert "'soon' is neither" in err, err
    err = refused("--since", "1h", "--until", "2h", "--against", "fast")
    assert "is not before --until" in err, err
    err = refused("--request-ids", str(tmp_path / "none.txt"), "--against", "fast")
    assert "none.txt" in err, err

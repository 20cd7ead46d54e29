"""The canary walkthrough as a user runs it, on the stack of tests/e2e/test_up.py (one stack for
both: each `switchboard up` costs the suite half a minute): `switchboard config apply` of
config/examples/canary.yaml, traffic, `switchboard canary status|promote`, and the rows and
decisions in `switchboard sql`, and a replay of the captured tenant's requests against the
candidate. The shadow half of the example is checked in tests/integration/test_shadow.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from services.common.routing_config import load_config

EXPERIMENT = "balanced-next"
ROOT = Path(__file__).resolve().parents[2]


def switchboard(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command in another shell: only the data dir says where the stack is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["SWITCHBOARD_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "switchboard.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rows_of(
    data_dir: Path, query: str, at_least: int, timeout_s: float = 60, payloads: bool = False
) -> list[dict]:
    """Poll the metrics service's query endpoint (where `switchboard sql` asks, without a
    process start per poll) until ``query`` has ``at_least`` rows."""
    state = json.loads((data_dir / "run" / "stack.json").read_text())
    headers = {"authorization": f"Bearer {state['metrics_token']}"}
    if payloads:
        headers["x-switchboard-payloads"] = "read"
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    while time.monotonic() < deadline:
        answer = httpx.post(
            f"{state['metrics_url']}/query", json={"sql": query}, headers=headers, timeout=30
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        rows = [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]
        if len(rows) >= at_least:
            return rows
        time.sleep(0.3)
    raise AssertionError(f"{query}: {len(rows)} rows after {timeout_s} s: {rows}")


def walk_through_a_canary(base_url: str, key: str, data_dir: Path) -> None:
    """The README's walkthrough on a running default stack: `config apply` the example, then
    traffic, `canary status|promote`, and the rows and decisions; a bad file refused by name;
    SIGHUP brings the router back to its own file."""
    example = ROOT / "config" / "examples" / "canary.yaml"
    applied = switchboard(data_dir, "config", "apply", str(example))
    assert applied.returncode == 0, applied.stderr
    assert f"the router serves {load_config(example).hash}" in applied.stdout

    # the controller started the experiment from the config: 5 %, running
    started = rows_of(
        data_dir,
        "SELECT action, share_to, by FROM switchboard.decisions"
        f" WHERE experiment = '{EXPERIMENT}' AND action = 'start'",
        1,
    )
    assert started[0]["share_to"] == 5 and started[0]["by"].startswith("controller-")
    status = switchboard(data_dir, "canary", "status")
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith(EXPERIMENT))
    assert "sim-balanced-next" in line and "running" in line and " 5 " in f" {line} "

    # traffic of many tenants through the balanced tier: about 5 % on the candidate
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        for i in range(60):
            body = {
                "model": "balanced",
                "messages": [{"role": "user", "content": "Summarise this ticket"}],
                "metadata": {"tenant": f"tenant-{i}"},
            }
            assert http.post("/v1/chat/completions", json=body).status_code == 200
    rows = rows_of(
        data_dir,
        "SELECT variant, share_pct, model, count() AS n FROM switchboard.llm_events"
        f" WHERE experiment = '{EXPERIMENT}' GROUP BY variant, share_pct, model",
        1,
    )
    assert {(r["variant"], r["share_pct"]) for r in rows} <= {("baseline", 5), ("candidate", 5)}
    assert sum(r["n"] for r in rows if r["variant"] == "baseline") >= 40

    # an operator moves it on; routers and the controller carry on from there
    promoted = switchboard(data_dir, "canary", "promote", EXPERIMENT)
    assert promoted.returncode == 0, promoted.stderr
    assert "promote 5% → 25%" in promoted.stdout
    status = switchboard(data_dir, "canary", "status", EXPERIMENT)
    line = next(x for x in status.stdout.splitlines() if x.startswith(EXPERIMENT))
    assert " 25 " in f" {line} " and "operator" in line
    assert "recent decisions" in status.stdout and "promote" in status.stdout
    rows_of(
        data_dir,
        f"SELECT action FROM switchboard.decisions WHERE experiment = '{EXPERIMENT}'"
        " AND by = 'operator'",
        1,
    )
    decided = switchboard(  # the command the README gives
        data_dir,
        "sql",
        "SELECT action, share_from, share_to, by FROM switchboard.decisions"
        f" WHERE experiment = '{EXPERIMENT}' AND by = 'operator'",
        "--format",
        "json",
    )
    assert decided.returncode == 0, decided.stderr
    (row,) = json.loads(decided.stdout)
    assert (row["action"], float(row["share_to"])) == ("promote", 25)

    # the README's replay: the captured walkthrough tenant's requests, against the candidate
    since = datetime.now(UTC) - timedelta(seconds=1)
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        for i in range(12):
            body = {
                "model": "fast",
                "messages": [{"role": "user", "content": f"Where is parcel {i}?"}],
                "metadata": {"tenant": "walkthrough"},
            }
            assert http.post("/v1/chat/completions", json=body).status_code == 200
    rows_of(
        data_dir,
        "SELECT request_id FROM switchboard.llm_payloads WHERE kind = 'output'"
        f" AND ts >= toDateTime64({since.timestamp():.3f}, 3, 'UTC')",
        12,
        payloads=True,
    )
    replayed = switchboard(
        data_dir, "replay", "--since", since.isoformat(), "--against", "sim-balanced-next",
        "--rate", "50", "--run", "walkthrough", "--wait-s", "60",
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "12 requests (12 captured" in replayed.stdout, replayed.stdout
    report = replayed.stdout.splitlines()
    assert any(x.split()[:3] == ["all", "12", "12"] for x in report), replayed.stdout
    assert any(x.startswith("short ") for x in report), replayed.stdout

    # a file that does not load is refused by name, and nothing is sent
    bad = data_dir / "bad.yaml"
    bad.write_text(example.read_text().replace("min_samples: 20", "min_samples: -1"))
    refused = switchboard(data_dir, "config", "apply", str(bad))
    assert refused.returncode == 2 and "min_samples" in refused.stderr
    # SIGHUP: the router reads its own file (the default config) again
    state = json.loads((data_dir / "run" / "stack.json").read_text())
    os.kill(state["pids"]["router"], signal.SIGHUP)
    own = load_config(ROOT / "config" / "simulated.yaml").hash
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{base_url}/health", timeout=10).json()["config_hash"] == own:
            break
        time.sleep(0.2)
    assert httpx.get(f"{base_url}/health", timeout=10).json()["config_hash"] == own

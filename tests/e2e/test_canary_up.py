"""The canary walkthrough as a user runs it: `switchboard up` on config/examples/canary.yaml,
traffic, `switchboard canary status|promote`, and the rows and decisions in `switchboard sql`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.common.routing_config import load_config
from switchboard.embedded import free_port
from tests.e2e.test_up import ROOT, Up, sql

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
EXPERIMENT = "balanced-next"


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


def rows_of(data_dir: Path, query: str, at_least: int, timeout_s: float = 60) -> list[dict]:
    """Poll the metrics service's query endpoint (where `switchboard sql` asks, without a
    process start per poll) until ``query`` has ``at_least`` rows."""
    state = json.loads((data_dir / "run" / "stack.json").read_text())
    headers = {"authorization": f"Bearer {state['metrics_token']}"}
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


def test_canary_walkthrough_on_the_embedded_stack(tmp_path: Path) -> None:
    data_dir = tmp_path / "sb"
    config = tmp_path / "canary.yaml"  # a copy: the test changes it, as an operator would
    shipped = (ROOT / "config" / "examples" / "canary.yaml").read_text()
    config.write_text(shipped)
    up = Up(data_dir, free_port(), SWITCHBOARD_CONFIG=str(config))
    try:
        base_url = up.wait_for_line(r"switchboard ready (http://\S+)", 240).group(1)
        key = up.wait_for_line(r"API key \(generated.*\): (sk-sb-\S+)", 5).group(1)
        assert "SIMULATOR" in "\n".join(up.lines)  # the example's models are simulated

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
            # and through the fast tier, whose shadow mirrors about 20 % to the candidate
            for i in range(60):
                body = {"model": "fast", "messages": [{"role": "user", "content": f"Ticket {i}"}]}
                answer = http.post("/v1/chat/completions", json=body)
                assert answer.status_code == 200 and answer.json()["model"] != "sim-balanced-next"
        compared = rows_of(
            data_dir,
            "SELECT outcome, baseline_model, candidate_model, similarity, similarity_by"
            " FROM switchboard.llm_shadow WHERE experiment = 'fast-shadow'",
            1,
        )
        for row in compared:
            assert (row["outcome"], row["candidate_model"]) == ("compared", "sim-balanced-next")
            assert 0 <= row["similarity"] <= 1 and row["similarity_by"] == "text"
        rows = rows_of(
            data_dir,
            "SELECT variant, share_pct, model, count() AS n FROM switchboard.llm_events"
            f" WHERE experiment = '{EXPERIMENT}' GROUP BY variant, share_pct, model",
            1,
        )
        assert {(r["variant"], r["share_pct"]) for r in rows} <= {
            ("baseline", 5),
            ("candidate", 5),
        }
        assert sum(r["n"] for r in rows if r["variant"] == "baseline") >= 40

        # an operator moves it on; routers and the controller carry on from there
        promoted = switchboard(data_dir, "canary", "promote", EXPERIMENT)
        assert promoted.returncode == 0, promoted.stderr
        assert "promote 5% → 25%" in promoted.stdout
        status = switchboard(data_dir, "canary", "status", EXPERIMENT)
        line = next(x for x in status.stdout.splitlines() if x.startswith(EXPERIMENT))
        assert " 25 " in f" {line} " and "operator" in line
        rows_of(
            data_dir,
            "SELECT action FROM switchboard.decisions"
            f" WHERE experiment = '{EXPERIMENT}' AND by = 'operator'",
            1,
        )
        decided = sql(  # the command the README gives
            data_dir,
            "SELECT action, share_from, share_to, by FROM switchboard.decisions"
            f" WHERE experiment = '{EXPERIMENT}' AND by = 'operator'",
        )
        assert decided.returncode == 0, decided.stderr
        (row,) = json.loads(decided.stdout)
        assert (row["action"], float(row["share_to"])) == ("promote", 25)
        assert "recent decisions" in status.stdout and "promote" in status.stdout

        # live config: `config apply` reaches the running fleet; a bad file is refused by name
        applied = tmp_path / "applied.yaml"
        applied.write_text(shipped.replace("min_samples: 20", "min_samples: 30"))
        done = switchboard(data_dir, "config", "apply", str(applied))
        assert done.returncode == 0, done.stderr
        new_hash = load_config(applied).hash
        assert f"the router serves {new_hash}" in done.stdout
        bad = tmp_path / "bad.yaml"
        bad.write_text(shipped.replace("min_samples: 20", "min_samples: -1"))
        refused = switchboard(data_dir, "config", "apply", str(bad))
        assert refused.returncode == 2 and "min_samples" in refused.stderr
        # SIGHUP: the router reads its own file again
        config.write_text(shipped.replace("min_samples: 20", "min_samples: 40"))
        state = json.loads((data_dir / "run" / "stack.json").read_text())
        os.kill(state["pids"]["router"], signal.SIGHUP)
        file_hash = load_config(config).hash
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(f"{base_url}/health", timeout=10).json()
            if health["config_hash"] == file_hash:
                break
            time.sleep(0.2)
        assert health["config_hash"] == file_hash
    finally:
        code = up.stop()
    assert code == 0

"""Scenario 6, HTTP fuzzing: schemathesis generates requests from the router's own OpenAPI
document, valid ones and ones that break it, with the bearer key and without, and sends them to
the running router over HTTP.

Every answer is judged: a status of 500 or more, or a 4xx whose body is not OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}`` with a message and a code), counts as lost;
a 2xx to a call without the key counts as leaked; a call with no answer within 30 s counts as
stuck. Then the size limit is checked with real requests: a body declared over
``SWITCHBOARD_MAX_BODY_BYTES`` and a chunked one that passes it must both get a 413, and an inline
image over ``SWITCHBOARD_MAX_IMAGE_BYTES`` or with broken data a 400 naming it.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.result import Ok

from bench.common import Bench, RunningStack, routing_config, start_stack
from faults.common import Tally
from services.router.domain.images import MAX_IMAGE_BYTES
from switchboard.embedded import free_port

MODEL = "faults-fuzz"
PROFILE = {"ttft_s": 0.005, "tokens_per_s": 20000.0, "output_tokens": 8, "jitter": 0.0}
EXAMPLES = 90  # per operation, generation mode and key (with or without)
TIMEOUT_S = 30.0
LIMIT = 8 * 1024 * 1024  # the router's default SWITCHBOARD_MAX_BODY_BYTES


class Judge:
    def __init__(self) -> None:
        self.tally = Tally()
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.codes: Counter[str] = Counter()  # the error codes of the 4xx answers
        self.examples: list[str] = []

    def __call__(self, what: str, status: int | None, body: Any, authorised: bool) -> None:
        self.sent += 1
        if status is None:
            self.tally.stuck += 1
            self._example(f"{what}: no answer within {TIMEOUT_S:g} s")
            return
        self.statuses[status] += 1
        if status >= 500:
            self.tally.lost += 1
            self._example(f"{what}: {status} {str(body)[:200]}")
        elif status >= 400 and not _openai_error(body):
            self.tally.lost += 1
            self._example(f"{what}: {status} not OpenAI-shaped: {str(body)[:200]}")
        elif status >= 400:
            self.codes[body["error"]["code"]] += 1
        elif status < 300 and not authorised and what.startswith("POST"):
            self.tally.leaked += 1
            self._example(f"{what}: {status} without the key")

    def _example(self, line: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(line)


def _openai_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and bool(error["message"])
        and isinstance(error.get("type"), str)
        and isinstance(error.get("code"), str)
        and "param" in error
        and (error["param"] is None or isinstance(error["param"], str))
    )


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content[:200].decode(errors="replace")


def _send_cases(
    stack: RunningStack,
    judge: Judge,
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    authorised: bool,
    session: requests.Session,
) -> None:
    headers = {"authorization": f"Bearer {stack.api_key}"} if authorised else {}
    what = f"{operation.method.upper()} {operation.path} ({mode.value})"

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: schemathesis.Case) -> None:
        try:
            response = case.call(
                base_url=stack.base_url, session=session, headers=headers, timeout=TIMEOUT_S
            )
        except requests.Timeout:
            judge(what, None, None, authorised)
            return
        judge(what, response.status_code, _json(response.content), authorised)

    try:
        send()
    except Unsatisfiable:
        pass  # nothing to break: an operation without parameters or body has no negative cases


def _fuzz(stack: RunningStack, judge: Judge) -> int:
    """Every operation, positive and negative, with and without the key. Returns operations."""
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    session = requests.Session()
    operations = 0
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise RuntimeError(f"the router's OpenAPI document is invalid: {result.err()}")
        operations += 1
        for mode in schemathesis.GenerationMode:
            for authorised in (True, False):
                _send_cases(stack, judge, result.ok(), mode, authorised, session)
    return operations


def _chunks(total: int) -> Iterator[bytes]:
    yield b'{"model": "switchboard/auto", "messages": [{"role": "user", "content": "'
    for _ in range(total // (1 << 20)):
        yield b"x" * (1 << 20)
    yield b'"}]}'


def _limits(stack: RunningStack, judge: Judge) -> list[str]:
    """The body limit, declared and chunked: each must be a 413 naming the limit."""
    headers = {"authorization": f"Bearer {stack.api_key}", "content-type": "application/json"}
    url = f"{stack.base_url}/v1/chat/completions"
    failures = []
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for label, content in (
            ("declared", b"".join(_chunks(LIMIT + (1 << 20)))),
            ("chunked", _chunks(4 * LIMIT)),
        ):
            response = client.post(url, content=content, headers=headers)
            body = _json(response.content)
            judge(f"POST {label} body over the limit", response.status_code, body, True)
            if response.status_code != 413 or str(LIMIT) not in str(body):
                failures.append(f"{label}: {response.status_code}")
        over = base64.b64encode(bytes(MAX_IMAGE_BYTES + 1)).decode()
        for label, url, code in (
            ("inline image over the limit", f"data:image/png;base64,{over}", "image_too_large"),
            ("inline image not base64", "data:image/png;base64,%%%%", "invalid_image_url"),
        ):
            parts = [{"type": "image_url", "image_url": {"url": url}}]
            request = {
                "model": "switchboard/auto",
                "messages": [{"role": "user", "content": parts}],
            }
            response = client.post(
                url=f"{stack.base_url}/v1/chat/completions", json=request, headers=headers
            )
            body = _json(response.content)
            judge(f"POST {label}", response.status_code, body, True)
            error = body.get("error") if isinstance(body, dict) else None
            if (
                response.status_code != 400
                or not isinstance(error, dict)
                or error.get("code") != code
            ):
                failures.append(f"{label}: {response.status_code}")
    return failures


def run(bench: Bench) -> Tally:
    sim_url = bench.simulator(profiles={MODEL: PROFILE})
    bootstrap = bench.broker()
    redis_url = bench.redis()
    config = routing_config(bench.work_dir / "fuzz.yaml", sim_url, MODEL)
    # the metrics service answers POST /v1/feedback's question (was the request answered, and
    # for whom); fuzzed request ids are unknown, and answered 404 at once (no wait for rows)
    stack = start_stack(
        bench,
        config,
        bootstrap=bootstrap,
        redis_url=redis_url,
        metrics_port=free_port(),
        extra_env={"SWITCHBOARD_FEEDBACK_WAIT_S": "0"},
    )
    judge = Judge()
    operations = _fuzz(stack, judge)
    failures = _limits(stack, judge)
    judge.tally.lost += len(failures)
    tally = judge.tally
    tally.detail = (
        f"{judge.sent} requests on {operations} operations (schemathesis "
        f"{schemathesis.SCHEMATHESIS_VERSION}, {EXAMPLES} examples per operation, mode and key), "
        f"statuses {dict(sorted(judge.statuses.items()))}, error codes "
        f"{dict(judge.codes.most_common())}; limits: "
        + (
            "413 for bodies over (declared and chunked), 400 for inline images over or broken"
            if not failures
            else f"FAILED {failures}"
        )
        + (f"; e.g. {' | '.join(judge.examples)}" if judge.examples else "")
    )
    return tally

"""What capture keeps (services/common/capture.py) and when (the config's opt-in)."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.v1 import ChatRequest
from services.common.capture import IMAGE_MARK, input_record, output_record
from services.common.routing_config import load_config

CONFIG = """
tiers:
  fast:
    models: [{model: openai/sim-light}]
rules:
  - {name: billing, when: 'task == "billing"', tier: fast, capture: true}
  - {name: short, when: len(prompt) < 200, tier: fast}
default: fast
capture:
  tenants: [acme]
"""


def test_capture_is_off_unless_opted_in(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    assert config.captures("acme", "short")  # the tenant opted in
    assert config.captures(None, "billing")  # the rule did
    assert not config.captures("globex", "short")
    assert not config.captures(None, "default")
    path.write_text(CONFIG.split("capture:\n")[0].replace(", capture: true", ""))
    plain = load_config(path)
    assert not any(plain.captures(t, r) for t in ("acme", None) for r in ("billing", "short"))


def test_the_input_is_kept_as_a_replay_sends_it_with_every_text_redacted() -> None:
    request = ChatRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Reply to jane@example.com"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "my card is 4111 1111 1111 1111"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                },
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"ip": "10.0.0.7"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "call +44 20 7946 0958"},
            ],
            "user": "bob@example.org",
            "temperature": 0.2,
            "metadata": {"tenant": "acme", "tags": {"contact": "ann@example.net"}},
        }
    )
    kept = input_record(request, "fast", "short", "h")
    text = kept.text
    for secret in ("jane@", "4111", "AAAA", "10.0.0.7", "7946", "bob@", "ann@", "acme"):
        assert secret not in text, secret
    assert kept.redactions == {"email": 3, "card": 1, "image": 1, "ip": 1, "phone": 1}
    body = json.loads(text)
    again = ChatRequest.model_validate(body)  # a replay sends it as it is
    assert again.temperature == 0.2 and again.messages[1].text() == "my card is [CARD]\n[IMAGE]"
    assert IMAGE_MARK in json.dumps(body["messages"][1]["content"])
    assert kept.tenant_hash and kept.kind == "input"


def test_the_output_is_redacted_too() -> None:
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}])
    kept = output_record(request, "fast", "short", "h", "sim-light", "write to a@b.io")
    assert (kept.text, kept.kind, kept.model) == ("write to [EMAIL]", "output", "sim-light")

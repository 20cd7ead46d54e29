"""The semantic stage: what a decision costs with it, and the router's throughput with it on and off.

Three parts, side by side in one run:

* **decision cost at batch 1**: the eval set's prompts (eval/routing-set.jsonl) decided one at a
  time in this process by the shipped config (config/simulated.yaml), the stage on: rules,
  encoder, classifier. p50 and p95 per decision, and the same prompts by the rules alone.
* **encoder throughput by batch size**: the same texts encoded in batches of 1, 4 and 16; texts
  per second and ms per text (what micro-batching buys under load).
* **start-up and memory**: a fresh process imports the stage and builds it from the shipped
  config (model, graph, int8 quantization, session, classifier); seconds, and RSS before and after.
* **router throughput**: one router process routes Kafka ingress requests on the shipped config,
  and another the same requests on the config with its ``semantic`` section removed;
  decisions/s, CPU per decision and peak RSS of each. Requests are the router scenario's mix
  (bench/decisions.py), each made unique so the encoder's cache never answers; the rules-only
  router gets 15 times as many (the first ones the same), or it is done before it can be timed.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT, Bench, Section, percentile
from bench.decisions import CONFIG, request_payload, route_all, rules_only
from schemas.v1 import ChatRequest
from services.common.routing_config import load_config
from services.router.adapters.embedder import Encoder
from services.router.domain.classify import classify
from services.router.domain.semantic import text_of
from services.router.stage import SemanticStage
from switchboard.evaluate import load_items

EVAL_SET = ROOT / "eval" / "routing-set.jsonl"
BATCHES = (1, 4, 16)


def eval_requests() -> list[ChatRequest]:
    tiers = load_config(CONFIG).tier_names
    return [item.request for item in load_items(EVAL_SET, tiers)]


def decision_cost(requests: list[ChatRequest]) -> dict[str, Any]:
    """Per-decision ms, the stage on and the rules alone, each prompt decided once (after a
    warm-up pass over the first 20)."""
    config = load_config(CONFIG)
    started = time.perf_counter()
    stage = SemanticStage.for_config(config)
    startup_s = time.perf_counter() - started
    if stage is None:
        raise RuntimeError(f"{CONFIG} has no semantic section")
    semantic = stage.matcher(config)
    try:
        for request in requests[:20]:
            classify(request, config, semantic)
        on, off = [], []
        for request in requests:
            t0 = time.perf_counter()
            classify(request, config, semantic)
            t1 = time.perf_counter()
            classify(request, config)
            t2 = time.perf_counter()
            on.append((t1 - t0) * 1000)
            off.append((t2 - t1) * 1000)
    finally:
        stage.close()
    on.sort()
    off.sort()
    return {
        "prompts": len(requests),
        "stage_startup_s": round(startup_s, 2),
        "on_p50_ms": round(percentile(on, 50), 2),
        "on_p95_ms": round(percentile(on, 95), 2),
        "off_p50_ms": round(percentile(off, 50), 4),
        "off_p95_ms": round(percentile(off, 95), 4),
    }


def encoder_batches(requests: list[ChatRequest], rounds: int) -> dict[str, Any]:
    encoder = Encoder()
    texts = [text_of(r) for r in requests]
    encoder.encode(texts[:8])
    out: dict[str, Any] = {}
    for size in BATCHES:
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(0, len(texts), size):
                encoder.encode(texts[i : i + size])
            best = min(best, time.perf_counter() - t0)
        out[str(size)] = {
            "texts_per_s": round(len(texts) / best),
            "ms_per_text": round(best * 1000 / len(texts), 2),
        }
    return out


_STARTUP = """
import json, sys, time, psutil
t0 = time.perf_counter()
rss0 = psutil.Process().memory_info().rss
from services.common.routing_config import load_config
from services.router.stage import SemanticStage
imported = time.perf_counter()
stage = SemanticStage.for_config(load_config(sys.argv[1]))
built = time.perf_counter()
print(json.dumps({"import_s": imported - t0, "build_s": built - imported,
                  "rss_before_mb": rss0 / 2**20,
                  "rss_after_mb": psutil.Process().memory_info().rss / 2**20}))
"""


def stage_startup() -> dict[str, float]:
    """Cold start of the stage in a fresh process: imports, then the build."""
    done = subprocess.run(
        [sys.executable, "-c", _STARTUP, str(CONFIG)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: round(v, 2) for k, v in figures.items()}


def unique_payloads(count: int, seed: int) -> list[bytes]:
    """The router scenario's request mix, each user text ending in its own number."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        body = request_payload(rng, i)
        for message in body["messages"]:
            if message["role"] == "user" and isinstance(message["content"], str):
                message["content"] += f" (ticket {i})"
        out.append(json.dumps(body).encode())
    return out


def run(bench: Bench) -> Section:
    requests = eval_requests()
    if bench.quick:
        requests = requests[:40]
    cost = decision_cost(requests)
    batches = encoder_batches(requests, bench.scale(3, 1))
    startup = stage_startup()
    messages = bench.scale(4_000, 300)
    payloads = unique_payloads(messages * 15, seed=17)
    runs = {
        "off": (load_config(rules_only(bench.work_dir)), payloads),
        "on": (load_config(CONFIG), payloads[:messages]),
    }
    routers: dict[str, Any] = {}
    for name, (config, sent) in runs.items():
        with bench.scope():
            window, outputs, _ = asyncio.run(route_all(bench, sent, config))
        if sum(outputs.values()) != len(sent):
            raise RuntimeError(f"{len(sent)} requests in, {sum(outputs.values())} out: {outputs}")
        counted = window.last_count - window.first_count
        routers[name] = {
            "messages": len(sent),
            "decisions_per_s": round(window.rate) if counted else None,
            "cpu_ms_per_decision": round(window.cpu_s * 1000 / counted, 3) if counted else None,
            "rss_mb": round(window.rss_mb, 1),
            "window_messages": counted,
        }
    data = {"decision": cost, "encoder_batches": batches, "startup": startup, "router": routers}
    return Section(key="semantic", data=data, markdown=_markdown(data))


def _markdown(d: dict[str, Any]) -> str:
    c, r, st = d["decision"], d["router"], d["startup"]
    rows = [
        f"| {name} | {r[name]['messages']:,} | {r[name]['decisions_per_s']} "
        f"| {r[name]['cpu_ms_per_decision']} ms | {r[name]['rss_mb']} MB |"
        for name in ("off", "on")
    ]
    batch_rows = [
        f"| {size} | {v['texts_per_s']} | {v['ms_per_text']} ms |"
        for size, v in d["encoder_batches"].items()
    ]
    return "\n".join(
        [
            "### Semantic stage (all-MiniLM-L6-v2 on ONNX Runtime, one thread)",
            "",
            f"One decision at batch 1, {c['prompts']} prompts of eval/routing-set.jsonl, "
            f"config/simulated.yaml: **{c['on_p50_ms']} ms p50, {c['on_p95_ms']} ms p95** with "
            f"the stage (target p50 ≤ 10 ms), against {c['off_p50_ms']} ms / "
            f"{c['off_p95_ms']} ms by the rules alone.",
            "",
            f"Cold start in a fresh process: imports {st['import_s']} s, building the stage "
            f"(model, graph, int8 quantization, session, classifier) {st['build_s']} s; RSS "
            f"{st['rss_before_mb']} MB before, {st['rss_after_mb']} MB after.",
            "",
            "| batch | texts/s | ms per text |",
            "|---|---|---|",
            *batch_rows,
            "",
            "One router process routing unique Kafka ingress requests (the router scenario's "
            "mix; the rules-only router gets more, or it is done before it can be timed):",
            "",
            "| semantic stage | requests | decisions/s | router CPU per decision | peak RSS |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )

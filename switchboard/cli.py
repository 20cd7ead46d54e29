"""``switchboard``: run the embedded stack, one service, or ask the metrics store a question.

switchboard up                       broker, Redis, simulator, router, workers, metrics
switchboard router | metrics         one service (settings from SWITCHBOARD_* variables)
switchboard worker --tier NAME       one tier's worker
switchboard controller               the canary controller (one active instance at a time)
switchboard shadow                   the shadow worker: mirrored requests to shadow candidates
switchboard canary status [NAME]     experiments: share in force, status, recent decisions
switchboard canary promote|rollback|pause|resume NAME
switchboard simulator                the provider simulator (not a model)
switchboard sql "<query>"            read-only SQL on the metrics store, printed as a table
switchboard report [--since 24h]     the decision matrix (table, csv, json, or html with charts)
switchboard check-config [PATH]      validate a routing config and print its hash
switchboard eval DATA.jsonl          score a routing config on labelled prompts
switchboard train DATA.jsonl -o F    fit the semantic stage's route classifier
switchboard config apply FILE        validate a routing config, then apply it to the running fleet
switchboard topics [--check]         create or update every topic as the settings say
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields


def _run_service(name: str, tier: str | None = None) -> int:
    from services.common.routing_config import ConfigError
    from services.common.runtime import PortInUse, run_service, setup_logging

    try:
        if name == "router":
            from services.router.app import run as run_router
            from services.router.config import RouterSettings

            rs = RouterSettings()
            setup_logging(rs.log_level, "router")
            run_service(run_router(rs))
        elif name == "worker":
            from services.workers.app import run as run_worker
            from services.workers.config import WorkerSettings

            ws = WorkerSettings(tier=tier) if tier else WorkerSettings()
            if not ws.tier:
                print("worker: name a tier with --tier or SWITCHBOARD_TIER", file=sys.stderr)
                return 2
            setup_logging(ws.log_level, f"worker[{ws.tier}]")
            run_service(run_worker(ws))
        elif name == "controller":
            from services.controller.app import run as run_controller
            from services.controller.config import ControllerSettings

            cs = ControllerSettings()
            setup_logging(cs.log_level, "controller")
            run_service(run_controller(cs))
        elif name == "shadow":
            from services.shadow.app import run as run_shadow
            from services.shadow.config import ShadowSettings

            ss = ShadowSettings()
            setup_logging(ss.log_level, "shadow")
            run_service(run_shadow(ss))
        elif name == "metrics":
            from services.metrics.adapters.store import chdb_missing
            from services.metrics.app import run as run_metrics
            from services.metrics.config import MetricsSettings

            ms = MetricsSettings()
            if missing := chdb_missing(ms.store_url):
                print(f"metrics: {missing}", file=sys.stderr)
                return 2
            setup_logging(ms.log_level, "metrics")
            run_service(run_metrics(ms))
    except (ConfigError, PortInUse) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    return 0


def _simulator() -> int:
    from services.simulator.__main__ import serve
    from services.simulator.config import SimulatorSettings

    serve(SimulatorSettings())
    return 0


def _check_config(path: str | None) -> int:
    from services.common.routing_config import ConfigError, load_config
    from services.common.settings import CommonSettings

    try:
        config = load_config(path or CommonSettings().config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{config.path}: ok, hash {config.hash}")
    for name, tier in config.spec.tiers.items():
        models = ", ".join(m.label for m in tier.models)
        if tier.cascade is not None:
            models = f"cascade: draft {tier.cascade.draft.label}, escalation {models}"
        print(f"  tier {name}: {models}")
    for rule, _ in config.rules_before:
        print(f"  rule {rule.name}: {rule.when} -> {rule.tier}")
    semantic = config.spec.semantic
    if semantic is not None:
        routes = (
            [f"{r} -> {t}" for r, t in config.classifier.routes]
            if config.classifier is not None
            else [f"{r} -> {spec.tier}" for r, spec in semantic.routes.items()]
        )
        source = f"classifier {semantic.classifier}" if semantic.classifier else "utterances"
        print(
            f"  semantic stage ({source}, threshold {semantic.threshold:g}, "
            f"{semantic.precision}): {', '.join(routes)}"
        )
    for rule, _ in config.rules_after:
        print(f"  rule {rule.name} (after the semantic stage): {rule.when} -> {rule.tier}")
    print(f"  default -> {config.spec.default}; fallback -> {config.spec.fallback}")
    for name, experiment in config.experiments.items():
        spec = experiment.spec
        steps = " -> ".join(f"{s:g}%" for s in spec.steps)
        share = (
            f"starting at {spec.start_share:g}% ({steps})"
            if spec.mode == "canary"
            else f"mirroring {spec.start_share:g}%"
        )
        print(
            f"  experiment {name}: {spec.mode} of {experiment.candidate} in tier {spec.tier}, "
            f"{share}, sticky by {spec.sticky}"
        )
    return 0


def _replay(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from switchboard.replay import ReplayArgs, replay_command, report_command

    if args.action == "report":
        if not args.run_name:
            parser.error("replay report: name the run (replay prints it when it starts)")
        return report_command(args.run_name, args.format)
    if args.run_name:
        parser.error(f"unexpected {args.run_name!r}: replay report RUN, or replay --against ...")
    if not args.against:
        parser.error("replay: --against MODEL|TIER|CONFIG is required")
    # every ReplayArgs field is an option of the same name
    return replay_command(ReplayArgs(**{f.name: getattr(args, f.name) for f in fields(ReplayArgs)}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the embedded stack and wait for Ctrl-C")
    sub.add_parser("router", help="run the router")
    worker = sub.add_parser("worker", help="run one tier's worker")
    worker.add_argument("--tier", help="tier to serve (or SWITCHBOARD_TIER)")
    sub.add_parser("metrics", help="run the metrics writer")
    sub.add_parser("controller", help="run the canary controller")
    sub.add_parser("shadow", help="run the shadow worker")
    canary = sub.add_parser("canary", help="see and steer experiments")
    canary.add_argument("action", choices=["status", "promote", "rollback", "pause", "resume"])
    canary.add_argument("name", nargs="?", help="the experiment (all, for status)")
    replay = sub.add_parser(
        "replay",
        help="send answered requests again, to a model, tier or config, and compare",
        description="switchboard replay --since 2h --against MODEL|TIER|CONFIG [--rate N]; "
        "switchboard replay report RUN (docs/experiments.md, Replay)",
    )
    replay.add_argument("action", nargs="?", choices=["report"], help="report RUN: print it again")
    replay.add_argument("run_name", nargs="?", metavar="RUN", help="the run, for report")
    replay.add_argument("--against", help="a model label, a tier, or a routing config file")
    replay.add_argument("--since", help="from: an ISO time (UTC) or an age (90s, 30m, 2h, 1d)")
    replay.add_argument("--until", help="to (default now): an ISO time or an age")
    replay.add_argument("--request-ids", metavar="FILE", help="these requests (one id per line)")
    replay.add_argument("--rate", type=float, default=10.0, help="requests a second (default 10)")
    replay.add_argument("--run", help="the run's name (default: its start time and 4 hex)")
    replay.add_argument(
        "--wait-s", type=float, default=120.0, help="give up after this long with no new result"
    )
    replay.add_argument(
        "--captured-only", action="store_true", help="leave out requests held only on Kafka"
    )
    replay.add_argument(
        "--limit", type=int, default=10_000, help="at most this many requests (default 10,000)"
    )
    replay.add_argument("--format", choices=["table", "json"], default="table", help="of report")
    topics = sub.add_parser(
        "topics",
        help="create or update every topic (partitions, replicas, retention, sizes)",
        description=(
            "Create every topic of the deployment, and set the retention, size limit and "
            "min.insync.replicas of those that exist, from the SWITCHBOARD_* settings. Warns, "
            "naming the topic, when one has fewer partitions than SWITCHBOARD_PARTITIONS."
        ),
    )
    topics.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 if a topic is missing or differs from the settings",
    )
    sub.add_parser("simulator", help="run the provider simulator")
    sql = sub.add_parser("sql", help="run a read-only query on the metrics store")
    sql.add_argument("query")
    sql.add_argument("--format", choices=["table", "json"], default="table")
    sql.add_argument(
        "--payloads",
        action="store_true",
        help="allow a query of llm_payloads (captured prompts and answers, redacted)",
    )
    report = sub.add_parser(
        "report",
        help="decision matrix per tier, model, variant and config",
        description="Latency (p50/p95/p99, TTFT), error rate on all and on noisy inputs, cost "
        "per 1k tokens, context-window use, fallback and escalation rates, per tier, model, "
        "variant and config hash. --format html draws the charts into one self-contained page.",
    )
    report.add_argument(
        "--since", default="24h", help="start: a duration back from now (30m, 24h, 7d) or ISO time"
    )
    report.add_argument("--until", default=None, help="end, the same way (default: now)")
    report.add_argument("--hours", type=float, default=None, help="the same as --since <H>h")
    report.add_argument("--tenant", default=None, help="only this tenant's requests")
    report.add_argument("--format", choices=["table", "csv", "json", "html"], default="table")
    report.add_argument("-o", "--output", default=None, help="write to this file, not stdout")
    report.add_argument(
        "--source",
        choices=["auto", "events", "aggregate"],
        default="auto",
        help="llm_events (exact, 7 days, per tenant) or llm_events_1m (per minute); auto: the "
        "aggregate for ranges over 24 h",
    )
    report.add_argument(
        "--cascades", action="store_true", help="only the cascade tiers' escalation figures"
    )
    config = sub.add_parser("config", help="apply a routing config to the running fleet")
    config.add_argument("action", choices=["apply"])
    config.add_argument("path")
    check = sub.add_parser("check-config", help="validate a routing config")
    check.add_argument("path", nargs="?")
    evaluate = sub.add_parser(
        "eval",
        help="score a routing config on labelled prompts",
        description="Route each labelled prompt of DATA.jsonl as the router would and print "
        "accuracy, precision and recall per tier, the confusion matrix, the rules that fired, "
        "and cost and p50 latency against the strongest tier (eval/README.md).",
    )
    evaluate.add_argument("data", help="JSONL: expected_tier and prompt (or messages) per line")
    evaluate.add_argument("--config", help="routing config (default: SWITCHBOARD_CONFIG)")
    evaluate.add_argument("--format", choices=["table", "json"], default="table")
    evaluate.add_argument(
        "--hours", type=float, default=24.0, help="metrics store window for p50s (default 24)"
    )
    evaluate.add_argument(
        "--output-tokens",
        type=float,
        default=250.0,
        help="output tokens per answer for a tier with no traffic in the store (default 250)",
    )
    evaluate.add_argument(
        "--baseline",
        metavar="TIER",
        help="compare cost and latency with everything sent to this tier "
        "(default: the one whose first model costs most per output token)",
    )
    evaluate.add_argument(
        "--min-accuracy", type=float, help="exit 1 when accuracy is below this (0 to 1)"
    )
    trainer = sub.add_parser(
        "train",
        help="fit the semantic stage's route classifier on labelled prompts",
        description="Encode each labelled prompt of DATA.jsonl as the router does, fit a "
        "classifier over routes (one per class), print its cross-validated tier accuracy and "
        'write it for a routing config\'s semantic.classifier (README "Semantic routing").',
    )
    trainer.add_argument("data", help="JSONL, as `switchboard eval` reads it")
    trainer.add_argument("--output", "-o", required=True, help="the classifier file to write")
    trainer.add_argument("--config", help="routing config whose tiers the labels name")
    trainer.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds (0: none; default 5)"
    )
    args = parser.parse_args(argv)

    if args.command == "up":
        from switchboard.up import up

        return up()
    if args.command == "config":
        from switchboard.config_cmd import apply_command

        return apply_command(args.path)
    if args.command == "canary":
        from switchboard.canary import canary_command

        return canary_command(args.action, args.name)
    if args.command == "replay":
        return _replay(args, replay)
    if args.command in ("router", "metrics", "controller", "shadow"):
        return _run_service(args.command)
    if args.command == "worker":
        return _run_service("worker", args.tier)
    if args.command == "topics":
        from switchboard.topics_cmd import main as topics_main

        return topics_main(args.check)
    if args.command == "simulator":
        return _simulator()
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "eval":
        from switchboard.evaluate import eval_command

        return eval_command(
            args.data,
            args.config,
            args.format,
            args.hours,
            args.output_tokens,
            args.min_accuracy,
            args.baseline,
        )
    if args.command == "train":
        from switchboard.train import train_command

        return train_command(args.data, args.output, args.config, args.folds)
    from switchboard.analyst import ReportArgs, report_command, sql_command

    if args.command == "sql":
        return sql_command(args.query, args.format, args.payloads)
    if args.format == "html" and not args.output:
        parser.error("report --format html: name the file with -o FILE")
    return report_command(
        ReportArgs(
            since=f"{args.hours:g}h" if args.hours is not None else args.since,
            until=args.until,
            tenant=args.tenant,
            fmt=args.format,
            output=args.output,
            source=args.source,
            cascades=args.cascades,
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""The soak's markdown report (``bench/results/soak-<date>.md``) from a ``SoakReport``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.soak import SoakReport


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def markdown(report: SoakReport, machine: dict[str, Any]) -> str:
    p, d = report.params, report.data
    failed = [c for c in report.criteria if not c.passed]
    verdict = "PASSED" if report.passed else f"FAILED ({len(failed)} of {len(report.criteria)})"
    w = d["windows"]
    lines = [
        f"# Soak, {machine['date']}: {verdict}",
        "",
        *_noise(d["others_cores"]),
        "`python -m bench.soak` (`make soak`): the real `switchboard up` (embedded Tansu broker, "
        "provider SIMULATOR) under steady sync and async traffic; criteria in `bench/soak.py`.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Python {machine['python']}, {machine['os']}, commit {machine['commit'] or '?'} "
        f"(host {machine['host']}).",
        "",
        f"Parameters: {p.minutes:g} min measured after a {p.warmup_s:g} s warm-up; sync "
        f"{p.rate:g} requests/s (model `fast`{', streamed' if p.stream else ''}); "
        f"{p.jobs_per_s:g} async jobs/s; simulator "
        f"latency scale {p.latency_scale:g}; bound {p.max_batches:,} batches. Windows: first "
        f"{w['first'][0]:g}-{w['first'][1]:g} s, last {w['last'][0]:g}-{w['last'][1]:g} s.",
        "",
        "## Criteria",
        "",
        *_table(
            ["criterion", "verdict", "measured"],
            [[c.key, "pass" if c.passed else "**FAIL**", c.detail] for c in report.criteria],
        ),
        "",
    ]
    gen = d["loadgen"]
    probe = d["probe_ms"]
    lines += [
        "## Sync requests",
        "",
        f"{d['requests_logged']:,} requests logged by the generator; measured part: "
        f"p50 {_cell(gen.get('p50_ms'))} ms, p99 {_cell(gen.get('p99_ms'))} ms, "
        f"{_cell(gen.get('errors'))} errors{_kinds(gen.get('error_kinds'))}, achieved "
        f"{_cell(gen.get('achieved_rps'))} requests/s (generator lag p99 "
        f"{_cell(gen.get('lag_p99_ms'))} ms).",
        "",
        f"Fresh-request probe ({len(probe['before'])} and {len(probe['after'])} sequential "
        f"requests), ms: before {probe['before']}; after {probe['after']}.",
        "",
        "### Per minute",
        "",
        *_table(
            [
                "minute",
                "requests",
                "errors",
                "p50 ms",
                "p99 ms",
                "broker CPU %",
                "broker RSS MB",
                "max batches",
            ],
            [
                [
                    m["minute"],
                    m["requests"],
                    m["errors"],
                    m["p50_ms"],
                    m["p99_ms"],
                    m["broker_cpu_pct"],
                    m["broker_rss_mb"],
                    m["max_batches"],
                ]
                for m in d["per_minute"]
            ],
        ),
        "",
    ]
    jobs, jc = d["jobs"], report.criterion("jobs").values
    lines += [
        "## Async jobs",
        "",
        f"{jobs['produced']:,} produced, {jc.get('unsent', 0)} refused by the broker; "
        f"{jobs['results']:,} results, error answers {jobs['error_answers'] or 'none'}; "
        f"{jc.get('lost', 0)} lost, {jc.get('duplicated', 0)} duplicated; "
        f"{jobs['strays']} answers to unknown ids, {jobs['unreadable']} unreadable, "
        f"{jobs['commit_failures']} failed commits.",
        "",
    ]
    bounded = report.criterion("bounded")
    topics = bounded.values.get("topics", {})
    lines += ["## Keeper: record batches per partition", ""]
    if topics:
        lines += [
            "The largest `batches_at_most` of any partition of each topic (a router's reply "
            "topics as one) in `keeper.json`; *rising* is per minute, for a topic that "
            "rose all through the load and so was not compacted during it.",
            "",
            *_table(
                ["topic", "first-half max", "last-window max", "max", "rising"],
                [
                    [
                        name,
                        t["first_half_max"],
                        t["last_window_max"],
                        t["max"],
                        t["rising_per_min"],
                    ]
                    for name, t in topics.items()
                ],
            ),
        ]
    else:
        lines.append(bounded.detail)
    lines += [
        "",
        "## Processes",
        "",
        "CPU is % of one core, the mean over each window's samples; RSS at the first and last "
        "sample. `others` is what the rest of the machine used, in cores.",
        "",
        *_table(
            ["process", "CPU % first", "CPU % last", "RSS MB first", "RSS MB last"],
            [
                [n, v["cpu_pct_first"], v["cpu_pct_last"], v["rss_mb_first"], v["rss_mb_last"]]
                for n, v in d["processes"].items()
            ],
        ),
        "",
        f"others, cores over the load: {_cores(d['others_cores'])}.",
        "",
    ]
    return "\n".join(lines)


def _cores(others: dict[str, Any]) -> str:
    if others["mean"] is None:
        return "-"
    return f"mean {others['mean']:.2f}, max {others['max']:.2f}"


def _noise(others: dict[str, Any]) -> list[str]:
    if not others["noisy"]:
        return []
    return [
        f"**Other programs on this machine used {others['mean']:.2f} cores on average during "
        f"the load (max {others['max']:.2f}): the latency and CPU figures are suspect.**",
        "",
    ]


def _kinds(kinds: dict[str, int] | None) -> str:
    return f" {kinds}" if kinds else ""

#!/usr/bin/env python3
"""Turn the benchmark's raw files (target/bench/*.json, written by tests/bench/run.sh and the
load generator) into tests/bench/RESULTS.md.

    summarize.py target/bench -o tests/bench/RESULTS.md
    summarize.py --line target/bench/storm-i128-r1.json     # one line, for progress output

Standard library only. Medians are over the runs of a scenario; the per-run values follow in
parentheses, in run order.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys

# The targets of issue 4 (this 2-core machine, loopback, medians of several runs).
TARGET_CONNS_PER_PROCESS = 19_000
TARGET_CONNS_PER_MACHINE = 100_000
TARGET_RSS_KIB_PER_CONN = 40
TARGET_CONNECTS_PER_SEC = 5_000
TARGET_CONNECT_P99_MS = 10
TARGET_EVENTS_PER_SEC = 200_000
TARGET_P99_HALF_LOAD_MS = 5
TARGET_WASM_NATIVE_RATIO = 0.80
# Issue 13 (density): per hibernated connection, wake-up p99.
TARGET_HIBERNATED_RSS_KIB = 12
TARGET_WAKE_P99_MS = 1.0
# Issue 23 (performance), and the figures it was filed with ("today").
TARGET_OVERLOAD_P99_MS = 200
TARGET_CLUSTER_KIB_PER_IDENTITY = 1
TARGET_CLUSTER_RATIO = 0.60
TARGET_CLUSTER_RESUME_FACTOR = 2
TARGET_LIVE_RSS_KIB = 32
TARGET_DELIVERIES_PER_CORE_VS_NODE = 3
BEFORE_23 = {
    "overload_p99": "1,500-1,700 ms (outside, pinned); 388 ms (`make bench`, unpinned)",
    "cluster_kib": "11 KiB",
    "cluster_ratio": "38 %",
    "cluster_resume": "10x",
    "hibernated": "17.1 KiB against Node's 6.7",
    "live": "53 KiB",
    "per_core": "1.35-1.8x (7.9 µs against Node's 10.1 µs per delivery)",
    "cores_sandbox": "65 %, 1.07 M/s",
    "cores_cluster": "40 %",
}
TARGET_CORES_WASM_NATIVE = 0.85
TARGET_CORES_DELIVERIES = 1_500_000
TARGET_CORES_CLUSTER_RATIO = 0.80
# The last run of tests/bench/cores.sh on a 16-core machine (make bench cannot measure these
# on the development machine's 2 cores): written by cores_summary.py, committed by hand.
CORES_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cores.json")


# ---------------------------------------------------------------------------------------
# Small helpers


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def get(report, *keys):
    """report[k1][k2]..., or None when any step is missing."""
    value = report
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def num(value, digits=0):
    """A number for a table: thousands separators, fixed digits; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if digits == 0:
        return f"{round(value):,}"
    return f"{value:,.{digits}f}"


def med_runs(reports, keys, digits=0):
    """'median (run1, run2, ...)' of a field over runs; the median alone for one run."""
    if isinstance(keys, str):
        keys = (keys,)
    values = [get(r, *keys) for r in reports]
    m = median(values)
    if len(values) <= 1:
        return num(m, digits)
    return f"{num(m, digits)} ({', '.join(num(v, digits) for v in values)})"


def med(reports, *keys):
    return median([get(r, *keys) for r in reports])


def cpu(reports, who, phase):
    """Median CPU % (100 = one core) of 'loadgen' or 'server' during a phase ('connect' or
    'publish'), falling back to the whole run for reports without phase figures."""
    values = [get(r, f"{who}_cpu_percent_{phase}") for r in reports]
    if all(v is None for v in values):
        values = [get(r, f"{who}_cpu_percent") for r in reports]
    return median(values)


def sum_of(reports, *keys):
    return sum(v for v in (get(r, *keys) for r in reports) if isinstance(v, (int, float)))


def cpu_us_per_event(report):
    """Gateway CPU time per delivered event while publishing and draining."""
    pct = get(report, "server_cpu_percent_publish")
    rate = get(report, "events_per_sec")
    if pct is None or not rate:
        return None
    return pct / 100 / rate * 1e6


def spread(reports, *keys, digits=0):
    """' (runs a-b)' when there are several runs, else ''."""
    values = [v for v in (get(r, *keys) for r in reports) if isinstance(v, (int, float))]
    if len(values) < 2:
        return ""
    return f" (runs {num(min(values), digits)}-{num(max(values), digits)})"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def run_number(path):
    m = re.search(r"-r(\d+)\.json$", path)
    return int(m.group(1)) if m else 0


def runs(out, prefix):
    """The reports of one scenario point, in run order."""
    files = sorted(glob.glob(os.path.join(out, f"{prefix}-r*.json")), key=run_number)
    return [r for r in (load(f) for f in files) if r is not None]


def verdict(ok):
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


# ---------------------------------------------------------------------------------------
# One line per run, for the driver's progress output


def one_line(report):
    parts = [
        f"{report.get('connections_established')}/{report.get('connections_requested')} connected",
    ]
    if report.get("connect_failures"):
        parts.append(f"{report['connect_failures']} failed")
    parts.append(f"{num(report.get('connect_rate_per_sec'))}/s")
    parts.append(
        f"connect p50/p99 {num(get(report, 'connect_ms', 'p50'), 2)}/"
        f"{num(get(report, 'connect_ms', 'p99'), 2)} ms"
    )
    if report.get("rss_kib_per_connection") is not None:
        parts.append(f"RSS {num(report['rss_kib_per_connection'], 1)} KiB/conn")
    if report.get("events_published"):
        parts.append(
            f"delivered {num(report.get('events_per_sec'))}/s, "
            f"p50/p99/p999 {num(get(report, 'latency_ms', 'p50'), 2)}/"
            f"{num(get(report, 'latency_ms', 'p99'), 2)}/"
            f"{num(get(report, 'latency_ms', 'p999'), 2)} ms, "
            f"losses {report.get('losses')}, misdeliveries {report.get('misdeliveries')}"
        )
    if report.get("closed_by_server"):
        parts.append(f"closed early {report['closed_by_server']}")
    phase = "publish" if report.get("events_published") else "connect"
    parts.append(f"{phase} CPU loadgen {num(cpu([report], 'loadgen', phase))} % "
                 f"server {num(cpu([report], 'server', phase))} %")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# Sections


def reasons_of(reports, key):
    """Summed {reason: count} over runs."""
    total = {}
    for r in reports:
        for reason, count in (r.get(key) or {}).items():
            total[reason] = total.get(reason, 0) + count
    return total


def describe_reasons(reasons):
    return "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items()))


def density_section(out, meta, findings):
    points = []
    for path in glob.glob(os.path.join(out, "density-*-r*.json")):
        name = re.match(r"density-(.+)-r\d+\.json$", os.path.basename(path)).group(1)
        if name not in points:
            points.append(name)
    if not points:
        return "## 1. Density\n\nNot run.\n"
    points.sort(key=lambda p: (p == "max", int(p) if p.isdigit() else 0))
    rows = []
    notes = []
    for point in points:
        reports = runs(out, f"density-{point}")
        established = med(reports, "connections_established")
        rss_after = med(reports, "server_rss_kib_after")
        total_per_conn = [
            (get(r, "server_rss_kib_after") / get(r, "connections_established"))
            if get(r, "server_rss_kib_after") and get(r, "connections_established")
            else None
            for r in reports
        ]
        label = f"max ({num(med(reports, 'connections_requested'))} asked)" if point == "max" else num(int(point))
        rows.append([
            label,
            med_runs(reports, "connections_established"),
            med_runs(reports, "connect_failures"),
            num(med(reports, "server_rss_kib_before") / 1024 if med(reports, "server_rss_kib_before") else None, 1),
            num(rss_after / 1024 if rss_after else None, 1),
            med_runs(reports, "rss_kib_per_connection", 1),
            num(median(total_per_conn), 1),
            med_runs(reports, "pss_kib_per_connection", 1),
            med_runs(reports, "connect_rate_per_sec"),
            num(cpu(reports, "server", "connect")),
            num(cpu(reports, "loadgen", "connect")),
            num(sum_of(reports, "closed_by_server")),
        ])
        failures = reasons_of(reports, "connect_failure_reasons")
        if failures:
            notes.append(f"- {label}: connect failures over all runs: {describe_reasons(failures)}.")
        closed = reasons_of(reports, "closed_reasons")
        if closed:
            notes.append(f"- {label}: connections ended early: {describe_reasons(closed)}.")
        findings["density"][point] = {
            "established": established,
            "rss_per_conn": med(reports, "rss_kib_per_connection"),
            "total_per_conn": median(total_per_conn),
            "pss_per_conn": med(reports, "pss_kib_per_connection"),
        }

    text = [
        "## 1. Density: idle connections on one gateway process",
        "",
        f"One fresh gateway per run; loadgen opens the connections (5 per user, the default "
        f"per-user limit) and samples the gateway's VmRSS before connecting and one second "
        f"after the last connection is up. *RSS/conn* is (after - before) / established, the "
        f"marginal cost of a connection with its own live Wasm instance; *total RSS/conn* "
        f"divides the whole process RSS. *PSS/conn* is the marginal proportional set size "
        f"(`/proc/<pid>/smaps_rollup`): a page mapped N times counts 1/N each time, so the "
        f"guest's read-only data pages, mapped into every instance and counted again in each "
        f"mapping's RSS, count once. The last point asks for the gateway's advertised "
        f"capacity plus a few, so the surplus must be refused (503).",
        "",
        f"- `vm.max_map_count`: {meta.get('sysctl_result', '?')} (used: {meta.get('max_map_count_used', '?')}).",
        f"- File descriptors: {meta.get('fd_result') or 'hard limit ' + str(meta.get('fd_hard', '?'))}; "
        f"the gateway and loadgen raise their soft limit to the hard one.",
        f"- Gateway capacity (`/readyz`, min(fd limit - 512, (max_map_count - 4096) / 5)): "
        f"{num(int(meta['capacity'])) if str(meta.get('capacity', '')).isdigit() else '-'}.",
        "",
        table(
            ["connections asked", "established", "refused/failed", "RSS before MiB",
             "RSS after MiB", "RSS/conn KiB", "total RSS/conn KiB", "PSS/conn KiB", "connect rate /s",
             "server CPU % connecting", "loadgen CPU % connecting", "closed early"],
            rows,
        ),
    ]
    if notes:
        text += ["", *notes]
    return "\n".join(text) + "\n"


def multi_section(out, findings):
    multi = load(os.path.join(out, "multi.json"))
    text = ["## 1b. 100,000 connections on one machine (several gateway processes)", ""]
    if multi is None:
        findings["multi"] = {"skipped": "not run (scenario not selected)"}
        return "\n".join(text + ["Not run (scenario not selected).", ""])
    if multi.get("skipped"):
        findings["multi"] = {"skipped": multi.get("reason")}
        return "\n".join(text + [f"**Not run**: {multi.get('reason')}.", ""])
    gateways = multi.get("gateways", [])
    reports = [load(os.path.join(out, f"multi-g{k}.json")) for k in range(len(gateways))]
    rows = []
    for k, g in enumerate(gateways):
        r = reports[k] or {}
        rows.append([
            k,
            num(r.get("connections_requested")),
            num(r.get("connections_established")),
            num(g["connections"]),
            num(g["rss_kib"] / 1024, 1),
            num(r.get("rss_kib_per_connection"), 1),
            num(r.get("connect_rate_per_sec")),
            num(r.get("connect_failures")),
            num(cpu([r], "loadgen", "connect")),
        ])
    peak = multi.get("peak_connections", 0)
    rss = multi.get("peak_rss_kib_total", 0)
    rows.append([
        "**total**",
        num(sum_of([r for r in reports if r], "connections_requested")),
        num(sum_of([r for r in reports if r], "connections_established")),
        f"**{num(peak)}**",
        num(rss / 1024, 1),
        num(rss / peak, 1) if peak else "-",
        "",
        num(sum_of([r for r in reports if r], "connect_failures")),
        "",
    ])
    findings["multi"] = {"peak": peak, "total_per_conn": rss / peak if peak else None,
                         "gateways": len(gateways)}
    text += [
        f"{len(gateways)} gateway processes, one loadgen process each (disjoint users and source "
        f"addresses), every connection held open until all loadgens had finished connecting; "
        f"the driver samples each gateway's `gateway_sessions_live` and VmRSS every second. "
        f"*live at peak* is the sample with the most connections open at the same time "
        f"({peak:,} at {multi.get('peak_at_secs')} s). MemAvailable at that moment: "
        f"{num(multi.get('mem_available_kib_at_peak', 0) / 1024 / 1024, 1)} GiB.",
        "",
        table(
            ["gateway", "asked", "established", "live at peak", "RSS at peak MiB",
             "RSS/conn KiB (marginal)", "connect rate /s", "failed", "loadgen CPU % connecting"],
            rows,
        ),
        "",
        "In the total row, RSS/conn is the whole RSS of all gateways divided by the live "
        "connections (baseline included).",
    ]
    if multi.get("cluster"):
        text += ["", f"The gateways were nodes of one cluster (one local nats-server with "
                 f"JetStream): at the peak they held {num(multi.get('cluster_feeds'))} live "
                 f"subscriptions, one per user per node (`gateway_cluster_feeds`); "
                 f"nats-server's RSS was {num(multi.get('nats_rss_kib', 0) / 1024, 1)} MiB."]
    failures = {}
    for r in reports:
        if r:
            for reason, count in (r.get("connect_failure_reasons") or {}).items():
                failures[reason] = failures.get(reason, 0) + count
    if failures:
        text += ["", f"Connect failures: {describe_reasons(failures)}."]
    codes = multi.get("loadgen_exit_codes", [])
    if any(codes):
        text += ["", f"loadgen exit codes: {codes} (non-zero: see the notes)."]
    return "\n".join(text) + "\n"


def storm_section(out, meta, findings):
    inflights = sorted({
        int(re.match(r"storm-i(\d+)-r\d+\.json$", os.path.basename(p)).group(1))
        for p in glob.glob(os.path.join(out, "storm-i*-r*.json"))
    })
    if not inflights:
        return "## 2. Connect storm\n\nNot run.\n"
    rows = []
    best = None
    notes = []
    for inflight in inflights:
        reports = runs(out, f"storm-i{inflight}")
        rate = med(reports, "connect_rate_per_sec")
        p99 = med(reports, "connect_ms", "p99")
        rows.append([
            inflight,
            med_runs(reports, "connections_established"),
            med_runs(reports, "connect_failures"),
            med_runs(reports, "connect_rate_per_sec"),
            med_runs(reports, ("connect_ms", "p50"), 2),
            med_runs(reports, ("connect_ms", "p99"), 2),
            num(med(reports, "connect_ms", "max"), 2),
            num(cpu(reports, "server", "connect")),
            num(cpu(reports, "loadgen", "connect")),
        ])
        failures = reasons_of(reports, "connect_failure_reasons")
        if failures:
            notes.append(f"- max in-flight {inflight}: connect failures: {describe_reasons(failures)}.")
        findings["storm"].append({"inflight": inflight, "rate": rate, "p99": p99,
                                  "spread": spread(reports, "connect_rate_per_sec"),
                                  "p99_spread": spread(reports, "connect_ms", "p99", digits=2)})
    text = [
        "## 2. Connect storm",
        "",
        f"{num(meta.get('storm_connections'))} new authenticated connections (JWT check, upgrade, "
        f"instantiation, welcome frame) started as fast as loadgen's in-flight cap allows, on a "
        f"fresh gateway per run. Connect time runs from the TCP connect to the `welcome` frame; "
        f"the rate is established connections / connect phase. More in flight raises the rate "
        f"until both cores are busy, then only adds queueing to the connect time.",
        "",
        table(
            ["max in-flight", "established", "failed", "connects /s", "p50 ms", "p99 ms",
             "max ms", "server CPU % connecting", "loadgen CPU % connecting"],
            rows,
        ),
    ]
    if notes:
        text += ["", *notes]
    return "\n".join(text) + "\n"


def delivery_rows(out, handler, levels, findings):
    rows = []
    notes = []
    for pct in levels:
        reports = runs(out, f"delivery-{handler}-{pct}")
        if not reports:
            continue
        offered = "as fast as taken" if pct == 100 else med_runs(reports, "publish_rate_target")
        rows.append([
            f"{pct} %",
            offered,
            med_runs(reports, "events_published_per_sec"),
            med_runs(reports, "events_per_sec"),
            med_runs(reports, ("latency_ms", "p50"), 2),
            med_runs(reports, ("latency_ms", "p99"), 2),
            med_runs(reports, ("latency_ms", "p999"), 2),
            num(sum_of(reports, "losses")),
            num(sum_of(reports, "misdeliveries")),
            num(sum_of(reports, "closed_by_server")),
            num(sum_of(reports, "publish_errors")),
            num(cpu(reports, "server", "publish")),
            num(cpu(reports, "loadgen", "publish")),
            num(median([cpu_us_per_event(r) for r in reports]), 1),
        ])
        findings["delivery"][(handler, pct)] = {
            "rate": med(reports, "events_per_sec"),
            "rate_spread": spread(reports, "events_per_sec"),
            "p50": med(reports, "latency_ms", "p50"),
            "p99": med(reports, "latency_ms", "p99"),
            "p999": med(reports, "latency_ms", "p999"),
            "p99_spread": spread(reports, "latency_ms", "p99", digits=2),
            "losses": sum_of(reports, "losses"),
            "misdeliveries": sum_of(reports, "misdeliveries"),
        }
        for key, what in (("closed_reasons", "connections ended early"),
                          ("connect_failure_reasons", "connect failures")):
            reasons = reasons_of(reports, key)
            if reasons:
                notes.append(f"- {handler} {pct} %: {what}: {describe_reasons(reasons)}.")
        samples = sorted({s for r in reports for s in (r.get("error_samples") or [])})
        for s in samples[:4]:
            notes.append(f"- {handler} {pct} %: loadgen error: `{s[:200]}`")
    return rows, notes


DELIVERY_HEADER = ["load", "offered events/s (published)", "published /s", "delivered /s",
                   "p50 ms", "p99 ms", "p999 ms", "losses", "misdeliveries",
                   "closed early", "publish errors", "server CPU % publishing",
                   "loadgen CPU % publishing", "server CPU µs / delivered event"]


def delivery_section(out, meta, findings):
    rows, notes = delivery_rows(out, "wasm", (25, 50, 100), findings)
    if not rows:
        return "## 3. Delivery\n\nNot run.\n"
    conns = meta.get("delivery_connections")
    users = meta.get("delivery_users")
    fanout = conns // users if conns and users else "?"
    text = [
        "## 3. Delivery: events to 10,000 connections",
        "",
        f"{num(conns)} connections ({num(users)} users x {fanout}); each published event names "
        f"one user (round robin) and is delivered to all {fanout} of that user's connections, so "
        f"*delivered /s* (frames received by loadgen per second, from the start of publishing "
        f"to the last receive) is {fanout} x the published rate when nothing is lost. Events "
        f"go through `POST /v1/publish/batch` from 4 publisher tasks for "
        f"{meta.get('publish_secs')} s. *100 %* publishes as fast as the gateway answers, in "
        f"batches of {meta.get('delivery_batch', 100)}; 25 % and 50 % offer that share of the "
        f"100 % delivered rate at a steady pace, in batches of {meta.get('steady_batch', 10)} (one "
        f"batch of 100 is a burst of 500 frames, and its last frame waits for the 499 before it). "
        f"Latency is publish (the "
        f"timestamp in the event) to receive, in ms. Every received event is checked against "
        f"the connection's user (*misdeliveries*); *losses* are events the gateway reported "
        f"queuing that never arrived. At 100 % the publishers are answered faster than the "
        f"events reach the clients, so per-connection queues grow for the whole run: there the "
        f"delivered rate is the result and the latency is mostly time spent queued (it grows "
        f"with the run's length). *Server CPU µs / delivered event* is the gateway's CPU time "
        f"while publishing and draining divided by the events delivered.",
        "",
        table(DELIVERY_HEADER, rows),
    ]
    if notes:
        text += ["", *notes]
    return "\n".join(text) + "\n"


def pair_ratios(out):
    """Wasm / native delivered rate for each run pair (run r of each, back to back)."""
    ratios = []
    for path in sorted(glob.glob(os.path.join(out, "delivery-wasm-100-r*.json")), key=run_number):
        wasm = load(path)
        native = load(path.replace("delivery-wasm-100-", "delivery-native-100-"))
        w = get(wasm, "events_per_sec") if wasm else None
        n = get(native, "events_per_sec") if native else None
        if w and n:
            ratios.append(w / n)
    return ratios


def sandbox_calls_rows(out):
    rows = []
    for instances in (1, 1000000):
        report = load(os.path.join(out, f"sandbox-calls-{instances}.json"))
        if not report:
            continue
        w, n = report["sandbox_ns_per_call"], report["native_ns_per_call"]
        rows.append([
            report["reservation"],
            num(w), num(n), num(w - n), num(n / w * 100, 1) + " %",
        ])
    return rows


def native_section(out, findings):
    rows, notes = delivery_rows(out, "native", (100,), findings)
    if not rows:
        return "## 4. Sandbox cost\n\nNot run.\n"
    wasm_rows, _ = delivery_rows(out, "wasm", (100,), {"delivery": {}})
    ratios = pair_ratios(out)
    ratio = median(ratios) if ratios else None
    findings["ratio"] = ratio
    findings["ratios"] = ratios
    header = ["handler"] + DELIVERY_HEADER[:1] + DELIVERY_HEADER[2:]
    table_rows = []
    for name, r in (("Wasm (one instance per connection)", wasm_rows), ("native (benchmark build)", rows)):
        for row in r:
            table_rows.append([name, row[0]] + row[2:])
    per_pair = ", ".join(num(r * 100, 1) for r in ratios)
    text = [
        "## 4. Sandbox cost: Wasm vs native handler",
        "",
        "The 100 % delivery scenario again, each run right after the Wasm run of the same "
        "number, against `gateway-bench-native serve --native-handler-for-benchmark` (built with "
        "`--features native-handler`): the same reference handler logic compiled into the "
        "gateway, one state object per connection, no Wasm. It exists only for this comparison.",
        "",
        table(header, table_rows),
        "",
        f"**Wasm / native delivered throughput: {num(ratio * 100, 1) + ' %' if ratio else '-'}** "
        f"(median of the per-pair ratios: {per_pair or '-'} %)",
    ]
    calls = sandbox_calls_rows(out)
    if calls:
        text += [
            "",
            "Per call, without sockets (`target/release/sandbox_calls`: the reference handler's "
            "`on-event` on one instance with loadgen's event shape, median of 5 rounds of "
            "200,000 calls; *native* is the same handler logic given the same owned copies). "
            "The gateway uses *full* reservations while its capacity fits the address space "
            "(about 24,000 connections), *compact* above (README, Capacity):",
            "",
            table(["guest memory reservation", "sandbox ns/call", "native ns/call",
                   "sandbox overhead ns/call", "native / sandbox"], calls),
        ]
    if notes:
        text += ["", *notes]
    return "\n".join(text) + "\n"


def targets_section(findings):
    d = findings["density"]
    max_point = d.get("max", {})
    per_process = max_point.get("established")
    rss_max = max_point.get("rss_per_conn")
    total_max = max_point.get("total_per_conn")
    multi = findings.get("multi", {})
    rows = []
    rows.append([
        f">= {TARGET_CONNS_PER_PROCESS:,} connections per gateway process",
        (f"{num(per_process)} established (capacity {num(findings.get('capacity'))})"
         if per_process is not None else "-"),
        verdict(per_process >= TARGET_CONNS_PER_PROCESS if per_process is not None else None),
    ])
    if "peak" in multi:
        peak = multi["peak"]
        rows.append([
            f">= {TARGET_CONNS_PER_MACHINE:,} connections on the machine",
            f"{num(peak)} at the same time",
            verdict(peak >= TARGET_CONNS_PER_MACHINE),
        ])
    else:
        rows.append([
            f">= {TARGET_CONNS_PER_MACHINE:,} connections on the machine",
            f"not run: {multi.get('skipped', 'not run')}",
            "**not measured**",
        ])
    rss_text = "-"
    if rss_max is not None:
        rss_text = f"{num(rss_max, 1)} KiB marginal, {num(total_max, 1)} KiB whole-process at {num(per_process)} connections"
        if multi.get("total_per_conn"):
            rss_text += f"; {num(multi['total_per_conn'], 1)} KiB whole-process over {num(multi['peak'])} on {multi.get('gateways')} gateways"
    rss_ok = None
    if total_max is not None:
        rss_ok = total_max <= TARGET_RSS_KIB_PER_CONN
        if multi.get("total_per_conn"):
            rss_ok = rss_ok and multi["total_per_conn"] <= TARGET_RSS_KIB_PER_CONN
    rows.append([f"<= {TARGET_RSS_KIB_PER_CONN} KiB process RSS per connection (verdict on whole-process RSS / connections)",
                 rss_text, verdict(rss_ok)])

    storm = [s for s in findings["storm"] if s["rate"] is not None]
    if storm:
        passing = [s for s in storm if s["rate"] >= TARGET_CONNECTS_PER_SEC and s["p99"] is not None and s["p99"] <= TARGET_CONNECT_P99_MS]
        fastest = max(storm, key=lambda s: s["rate"])
        best = max(passing, key=lambda s: s["rate"]) if passing else fastest
        rows.append([
            f">= {TARGET_CONNECTS_PER_SEC:,} connects/s with p99 <= {TARGET_CONNECT_P99_MS} ms",
            f"{num(best['rate'])}/s{best['spread']}, p99 {num(best['p99'], 2)} ms{best['p99_spread']} "
            f"at max in-flight {best['inflight']}",
            verdict(bool(passing)),
        ])
    else:
        rows.append([f">= {TARGET_CONNECTS_PER_SEC:,} connects/s, p99 <= {TARGET_CONNECT_P99_MS} ms", "-", verdict(None)])

    full = findings["delivery"].get(("wasm", 100))
    half = findings["delivery"].get(("wasm", 50))
    rows.append([
        f">= {TARGET_EVENTS_PER_SEC:,} events/s delivered over 10,000 connections",
        f"{num(full['rate'])}/s{full['rate_spread']}" if full and full["rate"] else "-",
        verdict(full["rate"] >= TARGET_EVENTS_PER_SEC if full and full["rate"] else None),
    ])
    rows.append([
        f"p99 publish-to-receive <= {TARGET_P99_HALF_LOAD_MS} ms at half load",
        (f"{num(half['p99'], 2)} ms{half['p99_spread']} at {num(half['rate'])}/s"
         if half and half["p99"] is not None else "-"),
        verdict(half["p99"] <= TARGET_P99_HALF_LOAD_MS if half and half["p99"] is not None else None),
    ])
    ratio = findings.get("ratio")
    native = findings["delivery"].get(("native", 100))
    rows.append([
        f"Wasm >= {TARGET_WASM_NATIVE_RATIO:.0%} of native delivery throughput",
        (f"{num(ratio * 100, 1)} % (median of the per-pair ratios "
         f"{', '.join(num(r * 100, 1) for r in findings.get('ratios', []))}; medians "
         f"{num(full['rate'])} vs {num(native['rate'])} /s)") if ratio and full and native else "-",
        verdict(ratio >= TARGET_WASM_NATIVE_RATIO if ratio else None),
    ])
    mis = sum(v["misdeliveries"] for v in findings["delivery"].values())
    losses = sum(v["losses"] for v in findings["delivery"].values())
    rows.append(["misdeliveries (must be 0)", num(mis), verdict(mis == 0)])
    rows.append(["losses on open connections", num(losses), "-"])
    hib = findings.get("hibernated_rss")
    rows.append([
        f"<= {TARGET_HIBERNATED_RSS_KIB} KiB RSS per hibernated connection (issue 13)",
        f"{num(hib, 1)} KiB at {num(findings.get('hibernated_n'))} (section 9)" if hib is not None else "-",
        verdict(hib <= TARGET_HIBERNATED_RSS_KIB if hib is not None else None),
    ])
    wake = findings.get("wake_p99_ms")
    rows.append([
        f"wake-up p99 <= {TARGET_WAKE_P99_MS} ms (issue 13)",
        f"<= {num(wake, 3)} ms (bucket bound)" if wake is not None else "-",
        verdict(wake <= TARGET_WAKE_P99_MS if wake is not None else None),
    ])
    return "\n".join([
        "## Targets",
        "",
        "Issue 4's and issue 13's targets, against the medians below (this machine, gateway and load generator "
        "sharing its cores over loopback).",
        "",
        table(["target", "measured", "verdict"], rows),
    ]) + "\n"


ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMESTAMP = re.compile(r"^\S*\d{4}-\d\d-\d\dT[\d:.]+Z?\s*")


def overload_section(out, findings):
    paced = runs(out, "overload-paced")
    unpaced = runs(out, "overload-bytes")
    peer = runs(out, "overload-peer")
    if not (paced or unpaced or peer):
        return "## 11. Latency under overload\n\nNot run.\n"

    def cpu_per_delivery(reports):
        values = [v for v in (cpu_us_per_event(r) for r in reports) if v is not None]
        return median(values) if values else None

    rows = []
    for name, reports in (("gateway, queue-delay admission (default)", paced),
                          ("gateway, bytes only (`queue_delay_ms = 0`)", unpaced),
                          ("Node.js ws", peer)):
        if not reports:
            continue
        us = cpu_per_delivery(reports)
        rows.append([
            name,
            med_runs(reports, "events_published_per_sec"),
            med_runs(reports, "events_per_sec"),
            med_runs(reports, ("latency_ms", "p50"), 1),
            med_runs(reports, ("latency_ms", "p99"), 1),
            num(sum_of(reports, "publish_errors")),
            num(sum_of(reports, "losses")),
            num(sum_of(reports, "misdeliveries")),
            num(us, 2),
            num(1e6 / us) if us else "-",
        ])
    findings["overload"] = {
        "p99": med(paced, "latency_ms", "p99"),
        "rate": med(paced, "events_per_sec"),
        "bytes_p99": med(unpaced, "latency_ms", "p99"),
        "bytes_rate": med(unpaced, "events_per_sec"),
        "peer_p99": med(peer, "latency_ms", "p99"),
        "peer_rate": med(peer, "events_per_sec"),
        "cpu_us": cpu_per_delivery(paced),
        "peer_cpu_us": cpu_per_delivery(peer),
    }
    return "\n".join([
        "## 11. Latency under overload",
        "",
        "The harness of issue 23: the server on core 0 and the load generator on core 1 "
        "(`taskset`; when the machine has two cores), "
        f"{num(med(paced or peer, 'connections_established'))} connections of "
        f"{num(med(paced or peer, 'users'))} users, batches of 100 published by 4 publishers as "
        "fast as they are answered. Runs alternate: the gateway as configured, where, while the "
        "node's queue delay is above `limits.queue_delay_ms` (50 ms), publishes go at a little "
        "less than the pace the sessions take events, each waiting for its share; the same "
        "gateway with `queue_delay_ms = 0`, where only `max_queued_bytes` (64 MiB) bounds the "
        "backlog, as before; and the Node.js peer, which answers a publish once it has written "
        "its frames. Latency is from the publisher building the batch (before it is sent, so a "
        "publish's wait counts) to the client reading the event. *CPU µs* is the server's CPU "
        "time per delivered event; *per core* is deliveries per second of server CPU.",
        "",
        table(["server", "published /s", "delivered /s", "p50 ms", "p99 ms", "publish errors",
               "losses", "misdeliveries", "CPU µs", "per core /s"], rows),
    ]) + "\n"


def issue23_section(findings):
    o = findings.get("overload", {})
    rows = []
    p99, rate, bytes_rate = o.get("p99"), o.get("rate"), o.get("bytes_rate")
    rows.append([
        f"overload: p99 <= {TARGET_OVERLOAD_P99_MS} ms, throughput no lower (section 11)",
        BEFORE_23["overload_p99"],
        (f"p99 {num(p99, 1)} ms at {num(rate)}/s delivered; without the admission in the same "
         f"run p99 {num(o.get('bytes_p99'), 1)} ms at {num(bytes_rate)}/s; Node.js "
         f"{num(o.get('peer_p99'), 1)} ms at {num(o.get('peer_rate'))}/s") if p99 is not None else "-",
        verdict(p99 <= TARGET_OVERLOAD_P99_MS and rate >= 0.95 * bytes_rate
                if p99 is not None and rate and bytes_rate else None),
    ])
    us, peer_us = o.get("cpu_us"), o.get("peer_cpu_us")
    ratio = peer_us / us if us and peer_us else None
    rows.append([
        f"deliveries per core >= {TARGET_DELIVERIES_PER_CORE_VS_NODE}x Node's (section 11)",
        BEFORE_23["per_core"],
        f"{ratio:.2f}x ({num(us, 2)} against {num(peer_us, 2)} µs per delivery)" if ratio else "-",
        verdict(ratio >= TARGET_DELIVERIES_PER_CORE_VS_NODE if ratio else None),
    ])
    cluster = findings.get("cluster_ratio")
    rows.append([
        f"cluster node saturated >= {TARGET_CLUSTER_RATIO:.0%} of embedded, 2 cores (section 10)",
        BEFORE_23["cluster_ratio"],
        f"{num(cluster * 100, 1)} %" if cluster else "not run",
        verdict(cluster >= TARGET_CLUSTER_RATIO if cluster else None),
    ])
    factor = findings.get("cluster_resume_factor")
    rows.append([
        f"cluster resume storm within {TARGET_CLUSTER_RESUME_FACTOR}x of embedded (section 10)",
        BEFORE_23["cluster_resume"],
        f"{factor:.1f}x" if factor else "not run",
        verdict(factor <= TARGET_CLUSTER_RESUME_FACTOR if factor else None),
    ])
    per_identity = findings.get("cluster_kib_per_identity")
    rows.append([
        f"cluster cost per subscribed identity <= {TARGET_CLUSTER_KIB_PER_IDENTITY} KiB, over the embedded log's (section 12)",
        BEFORE_23["cluster_kib"],
        f"{num(per_identity, 2)} KiB" if per_identity is not None else "not run",
        verdict(per_identity <= TARGET_CLUSTER_KIB_PER_IDENTITY if per_identity is not None else None),
    ])
    hib, peer_rss = findings.get("hibernated_rss"), findings.get("peer_rss")
    rows.append([
        "hibernated connection < Node.js ws idle connection (sections 8, 9)",
        BEFORE_23["hibernated"],
        f"{num(hib, 1)} KiB against {num(peer_rss, 1)}" if hib and peer_rss else "-",
        verdict(hib < peer_rss if hib and peer_rss else None),
    ])
    live = findings["density"].get("max", {}).get("rss_per_conn")
    rows.append([
        f"live connection <= {TARGET_LIVE_RSS_KIB} KiB (section 1)",
        BEFORE_23["live"],
        f"{num(live, 1)} KiB" if live else "-",
        verdict(live <= TARGET_LIVE_RSS_KIB if live else None),
    ])
    cores = load(CORES_JSON) or {}
    where = (f"*16-core run of {cores.get('date')} at `{cores.get('commit')}`* "
             "([`cores.md`](cores.md)): ")
    sandbox = cores.get("sandbox")
    rows.append([
        f"16 cores: Wasm >= {TARGET_CORES_WASM_NATIVE:.0%} of native on 8 cores and "
        f">= {TARGET_CORES_DELIVERIES / 1e6:.1f} M deliveries/s",
        BEFORE_23["cores_sandbox"],
        (where + f"{num(sandbox['ratio'], 1)} %, {sandbox['wasm'] / 1e6:.2f} M/s (native "
         f"{sandbox['native'] / 1e6:.2f} M/s)") if sandbox else "not measured",
        verdict(sandbox["ratio"] >= 100 * TARGET_CORES_WASM_NATIVE
                and sandbox["wasm"] >= TARGET_CORES_DELIVERIES if sandbox else None),
    ])
    cluster16 = cores.get("cluster")
    rows.append([
        f"16 cores: cluster node saturated >= {TARGET_CORES_CLUSTER_RATIO:.0%} of embedded, "
        "NATS on its own cores",
        BEFORE_23["cores_cluster"],
        (where + f"{num(cluster16['ratio'] * 100, 1)} % ({num(cluster16['cluster'])} against "
         f"{num(cluster16['embedded'])} /s)") if cluster16 else "not measured",
        verdict(cluster16["ratio"] >= TARGET_CORES_CLUSTER_RATIO if cluster16 else None),
    ])
    return "\n".join([
        "## Targets of issue 23 (performance)",
        "",
        "Each target against the figure the issue was filed with and this run's. The two "
        "16-core rows are not measured by `make bench`: they come from the last run of "
        "`tests/bench/cores.sh` on a 16-core machine (`tests/bench/cores.json`).",
        "",
        table(["target", "filed with", "this run", "verdict"], rows),
    ]) + "\n"


def server_logs_section(out):
    counts = {}
    first = {}
    for path in sorted(glob.glob(os.path.join(out, "logs", "*.gateway.log"))):
        try:
            lines = open(path, errors="replace").read().splitlines()
        except OSError:
            continue
        for line in lines:
            line = ANSI.sub("", line)
            if not re.search(r"\b(WARN|ERROR)\b", line):
                continue
            # Group by message without the timestamp and per-connection ids.
            key = TIMESTAMP.sub("", line)
            key = re.sub(r"\b[0-9a-f]{8,}\b", "<id>", key)
            key = re.sub(r"\b\d+\b", "N", key)[:160]
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, (os.path.basename(path), TIMESTAMP.sub("", line)[:300]))
    text = ["## Server log warnings", ""]
    if not counts:
        text.append("No WARN or ERROR lines in any gateway log (`GATEWAY_LOG=warn`).")
    else:
        text.append("WARN/ERROR lines of all gateway logs (`target/bench/logs/*.gateway.log`), grouped:")
        text.append("")
        for key, count in sorted(counts.items(), key=lambda kv: -kv[1])[:12]:
            where, example = first[key]
            text.append(f"- {count} x `{example}` (first in {where})")
    return "\n".join(text) + "\n"


def machine_section(meta):
    mem_gib = meta.get("mem_total_kib", 0) / 1024 / 1024
    commit = meta.get("commit", "?") + (" + uncommitted changes" if meta.get("dirty") else "")
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`tests/bench/run.sh`, then `tests/bench/summarize.py`); the raw "
        "loadgen JSON of every run and all logs are under `target/bench/`. Do not edit by hand.",
        "",
        f"- Machine: {meta.get('nproc')} CPUs ({meta.get('cpu_model') or 'unknown model'}), "
        f"{mem_gib:.1f} GiB memory, Linux {meta.get('kernel')}",
        f"- Date: {meta.get('date')}",
        f"- Commit: `{commit}`",
        f"- Command: `{meta.get('command')}` ({meta.get('runs')} runs per point, medians shown with "
        f"per-run values in parentheses; wall time {meta.get('wall_secs')} s, of which builds "
        f"{meta.get('build_secs')} s)",
        "- Everything over loopback on this one machine: the gateway and the load generator "
        "share the CPUs, so loadgen's own CPU use (shown per scenario) is taken from the "
        "gateway. Throughputs here are what the gateway does with what is left. CPU % is "
        "per phase (connecting, or publishing + draining) with 100 % = one core, so the two "
        "together can reach 200 % on 2 CPUs.",
    ]
    if meta.get("quick"):
        lines.append("- **QUICK MODE (BENCH_QUICK=1): tiny numbers for development; not a benchmark.**")
    return "\n".join(lines) + "\n"


def notes_section(out):
    try:
        notes = [l for l in open(os.path.join(out, "notes.txt")).read().splitlines() if l.strip()]
    except OSError:
        notes = []
    text = ["## Notes from the run", ""]
    text += [f"- {n}" for n in notes] if notes else ["None: every run completed normally."]
    return "\n".join(text) + "\n"


def plot_data(out, findings):
    """The series tests/src/bin/benchplot.rs draws; written next to the raw data."""
    rss = sorted(
        (v["established"], v["total_per_conn"], v["rss_per_conn"], v.get("pss_per_conn"))
        for v in findings["density"].values()
        if v["established"] and v["total_per_conn"] and v["rss_per_conn"]
    )
    latency = sorted(
        (v["rate"], v["p50"], v["p99"], v["p999"])
        for (handler, _), v in findings["delivery"].items()
        if handler == "wasm" and v["rate"] and v["p50"] and v["p99"] and v["p999"]
    )
    with open(os.path.join(out, "plots.json"), "w") as f:
        json.dump({"rss": rss, "latency": latency, "rss_target_kib": TARGET_RSS_KIB_PER_CONN}, f, indent=2)


def plots_section():
    return "\n".join([
        "## Plots",
        "",
        "Drawn by `target/release/benchplot` from the medians above. RSS per connection "
        "against live connections (one gateway process):",
        "",
        "![RSS per connection](rss.png)",
        "",
        "Latency against load, 10,000 connections (the 25 % and 50 % points are steady "
        "publishing in batches of 10; the 100 % point publishes as fast as answered, in "
        "batches of 100, and its latency is mostly queueing):",
        "",
        "![Latency against load](latency.png)",
    ]) + "\n"


def resume_section(out):
    reports = runs(out, "resume")
    if not reports:
        return "## 5. Resume storm\n\nNot run.\n"
    first = reports[0]
    rows = [[
        f"run {i + 1}", num(r["recovered"]), num(r["failures"]), num(r["storm_secs"], 2),
        num(r["resumes_per_sec"]), num(r["recover_ms"]["p50"], 1), num(r["recover_ms"]["p99"], 1),
        num(r["recover_ms"]["max"], 1), num(r["history_bytes_per_event"]),
    ] for i, r in enumerate(reports)]
    def m(*keys, digits=0):
        return num(median([get(r, *keys) for r in reports]), digits)
    rows.append([
        "median", m("recovered"), m("failures"), m("storm_secs", digits=2),
        m("resumes_per_sec"), m("recover_ms", "p50", digits=1), m("recover_ms", "p99", digits=1),
        m("recover_ms", "max", digits=1), m("history_bytes_per_event"),
    ])
    return "\n".join([
        "## 5. Resume storm",
        "",
        f"`target/release/resume_storm`: {first['clients']:,} clients of {first['users']:,} users "
        f"each read one event, all disconnect, {first['missed_per_user']} events per user are "
        "published while they are away, then every client reconnects at once with "
        "`?since=<its last seq>` (at most 512 handshakes in flight). A client is recovered when "
        "it has `gateway.resumed` with `recovered: true` and every missed event in order; "
        "times are from the start of the storm. *Log bytes/event* is the growth of "
        "`gateway_history_bytes` over the burst (the log's own accounting of an event with "
        "its bookkeeping).",
        "",
        table(["", "recovered", "failures", "storm s", "resumes/s", "p50 ms", "p99 ms", "max ms",
               "log bytes/event"], rows),
    ]) + "\n"


def streams_section(out):
    reports = runs(out, "streams")
    if not reports:
        return "## 5b. AI output streams\n\nNot run.\n"
    first = reports[0]
    def m(mode, key, digits=0):
        return num(median([r[mode][key] for r in reports]), digits)
    rows = [[
        mode, m(mode, "appends_per_sec"), m(mode, "frames_per_sec"), m(mode, "bytes_per_sec"),
        m(mode, "frames_per_token", 3), m(mode, "cpu_us_per_append", 1),
        m(mode, "latency_ms_p50", 1), m(mode, "latency_ms_p99", 1),
    ] for mode in ("messages", "events")]
    snap = [r["snapshot"] for r in reports]
    return "\n".join([
        "## 5b. AI output streams",
        "",
        f"`target/release/streams_bench` (medians of {len(reports)} runs): "
        f"{first['messages']['connections']:,} connections of {first['messages']['users']:,} "
        "users, each user streaming one message at 50 appends/s (as fast as accepted when "
        "that is less), published in one batch per tick; then the same tokens as plain events "
        "to a fresh gateway. Every token must reach every connection of its user once and in "
        "order, or the run fails. Latency is from publish to receipt of each token (messages "
        "include the 40 ms rollup).",
        "",
        table(["", "appends/s", "frames/s", "bytes/s", "frames/token", "CPU us/append",
               "p50 ms", "p99 ms"], rows),
        "",
        f"A resume from before a {snap[0]['tokens']:,}-token message gets it as one snapshot of "
        f"{num(median([s['snapshot_frame_bytes'] for s in snap]))} bytes, "
        f"{num(median([s['connect_to_snapshot_ms_median'] for s in snap]), 2)} ms from connect; "
        f"the history holds {num(median([s['history_bytes_for_message'] for s in snap]))} bytes "
        "for it.",
    ]) + "\n"


def control_section(out):
    reports = runs(out, "control")
    if not reports:
        return "## 5c. Calls to the backend and presence webhooks\n\nNot run.\n"
    def m(*keys, digits=0):
        return num(med(reports, *keys), digits)
    rows = [
        ["through the gateway, one at a time", m("rpc_through_gateway", "p50_us"),
         m("rpc_through_gateway", "p99_us"), "-"],
        ["straight to the backend, one at a time", m("rpc_direct", "p50_us"),
         m("rpc_direct", "p99_us"), "-"],
        [f"through the gateway, {reports[0]['rpc_concurrent']['connections']} connections at once",
         m("rpc_concurrent", "latency", "p50_us"), m("rpc_concurrent", "latency", "p99_us"),
         m("rpc_concurrent", "calls_per_sec")],
        ["close to `user.offline` (debounce 0)", m("webhook_close_to_offline", "p50_us"),
         m("webhook_close_to_offline", "p99_us"), "-"],
    ]
    return "\n".join([
        "## 5c. Calls to the backend and presence webhooks",
        "",
        f"`target/release/control_bench` (medians of {len(reports)} runs): the real binary "
        "and a real HTTP backend (axum) on loopback. A call is an `echo` `{\"type\":\"rpc\"}` "
        "frame answered by `rpc_result`; direct is the same signed POST from the bench. The "
        "webhook delay is from a client's close to the receiver getting `user.offline` with "
        "`offline_after_secs = 0`; the configured debounce (5 s by default) adds to it.",
        "",
        table(["", "p50 us", "p99 us", "calls/s"], rows),
    ]) + "\n"


def sse_section(out):
    ws, sse, most = runs(out, "sse-ws"), runs(out, "sse-sse"), runs(out, "sse-max")
    if not ws and not sse:
        return "## 5d. Server-sent events against WebSocket\n\nNot run.\n"
    rows = []
    for name, reports in (("WebSocket (`/ws`)", ws), ("SSE (`/sse`)", sse)):
        rows.append([
            name,
            med_runs(reports, "connections_established"),
            med_runs(reports, "connect_failures"),
            med_runs(reports, ("connect_ms", "p50"), 2),
            med_runs(reports, ("connect_ms", "p99"), 2),
            med_runs(reports, "rss_kib_per_connection", 1),
            med_runs(reports, ("latency_ms", "p99"), 2),
            med_runs(reports, "losses"),
            med_runs(reports, "misdeliveries"),
        ])
    # Ratios within one run (the same machine state for both), then their median.
    ratios = [
        get(s_, "rss_kib_per_connection") / get(w, "rss_kib_per_connection")
        for w, s_ in zip(ws, sse)
        if get(w, "rss_kib_per_connection") and get(s_, "rss_kib_per_connection")
    ]
    lines = [
        "## 5d. Server-sent events against WebSocket",
        "",
        "The same connections (5 per user) and a light publish (2,000 events/s for 5 s) over "
        "each transport, alternating, a fresh gateway each run; loadgen reads `/sse` as plain "
        "HTTP/1.1 (de-chunked by hand). RSS per connection is the idle server's growth over "
        "start-up divided by the connections.",
        "",
        table(["transport", "connected", "failed", "connect p50 ms", "connect p99 ms",
               "RSS KiB/conn", "delivery p99 ms", "losses", "misdelivered"], rows),
    ]
    if ratios:
        lines += ["", f"SSE memory per connection against WebSocket, in the same run: "
                      f"{num(median(ratios), 2)}x (median of {len(ratios)})."]
    if most:
        r = most[0]
        lines += ["", f"Most SSE connections one process admitted: "
                      f"{num(get(r, 'connections_established'))} of "
                      f"{num(get(r, 'connections_requested'))} asked "
                      f"(RSS {num(get(r, 'rss_kib_per_connection'), 1)} KiB/conn); the "
                      "refusals are the node's capacity bound, the same as for WebSocket."]
    return "\n".join(lines) + "\n"


def tls_section(out):
    plain = runs(out, "tls-plain")
    wss = runs(out, "tls-wss")
    if not plain and not wss:
        return "## 6. TLS\n\nNot run.\n"
    rows = []
    for name, reports in (("ws:// (plain)", plain), ("wss:// (rustls)", wss)):
        rows.append([
            name,
            med_runs(reports, "connections_established"),
            med_runs(reports, "connect_failures"),
            med_runs(reports, "connect_rate_per_sec"),
            med_runs(reports, ("connect_ms", "p50"), 2),
            med_runs(reports, ("connect_ms", "p99"), 2),
            med_runs(reports, "rss_kib_per_connection", 1),
            med_runs(reports, "pss_kib_per_connection", 1),
            num(cpu(reports, "server", "connect")),
        ])
    ratio = ""
    rate_plain, rate_wss = med(plain, "connect_rate_per_sec"), med(wss, "connect_rate_per_sec")
    if rate_plain and rate_wss:
        ratio = f" TLS connects at {rate_wss / rate_plain:.0%} of the plain rate (medians)."
    return "\n".join([
        "## 6. TLS: connect rate and memory with wss://",
        "",
        "The connect storm at 32 in flight over `wss://` (ECDSA P-256 certificate, rustls with "
        "the ring provider, loadgen verifying it) and over `ws://`, alternating runs on fresh "
        f"gateways. Memory is sampled one second after the last connect.{ratio}",
        "",
        table(["", "established", "failed", "connects /s", "p50 ms", "p99 ms",
               "RSS KiB/conn", "PSS KiB/conn", "server CPU % connecting"], rows),
    ]) + "\n"


def startup_section(out):
    logs = os.path.join(out, "logs")
    found = {}
    for path in sorted(glob.glob(os.path.join(logs, "startup-*-r*.out"))):
        m = re.match(r"startup-(\w+)-(compile|cached)-r\d+\.out$", os.path.basename(path))
        text = open(path).read()
        ms = re.search(r"compile:\s+(\d+) ms", text)
        if not m or not ms:
            continue
        entry = found.setdefault(m.group(1), {"compile": [], "cached": [], "size": None,
                                              "instantiate": None, "resident": None})
        entry[m.group(2)].append(int(ms.group(1)))
        for key, pattern in (("size", r"size:\s+(\d+) bytes"),
                             ("instantiate", r"instantiate:\s+(\d+) us"),
                             ("resident", r"resident:\s+(\d+) KiB")):
            hit = re.search(pattern, text)
            if hit:
                entry[key] = int(hit.group(1))
    if not found:
        return "## 7. Guest start-up\n\nNot run.\n"
    names = {"rust": "Rust", "js": "JavaScript", "py": "Python"}
    rows = []
    for lang in ("rust", "js", "py"):
        e = found.get(lang)
        if not e:
            continue
        rows.append([
            names[lang],
            num(e["size"] / 1e6, 2) if e["size"] else "-",
            num(median(e["compile"])),
            num(median(e["cached"])),
            num(e["instantiate"]) if e["instantiate"] is not None else "-",
            num(e["resident"]) if e["resident"] is not None else "-",
        ])
    return "\n".join([
        "## 7. Guest start-up: compile, and the compile cache",
        "",
        "`gateway guest check` on each reference handler, as a start or a reload loads it: "
        "compiled with an empty `guest_cache_dir` (which stores the artifact), then again "
        "(which loads it). Medians of the runs; instantiation and resident memory per live "
        "instance from the same check.",
        "",
        table(["guest", "component MB", "compile ms", "from cache ms", "instantiate + init us",
               "resident KiB/instance"], rows),
    ]) + "\n"


def peer_section(out):
    density = runs(out, "peer-density")
    storm_files = glob.glob(os.path.join(out, "peer-storm-i*-r*.json"))
    inflight = None
    if storm_files:
        inflight = re.match(r"peer-storm-i(\d+)-r", os.path.basename(storm_files[0])).group(1)
    storm = runs(out, f"peer-storm-i{inflight}") if inflight else []
    delivery = runs(out, "peer-delivery")
    if not (density or storm or delivery):
        return "## 8. Peer: a Node.js ws server\n\nNot run.\n"
    points = sorted(
        int(m.group(1)) for p in glob.glob(os.path.join(out, "density-*-r1.json"))
        if (m := re.match(r"density-(\d+)-r1\.json$", os.path.basename(p)))
    )
    ours_density = runs(out, f"density-{points[-1]}") if points else []
    ours_storm = runs(out, f"storm-i{inflight}") if inflight else []
    ours_delivery = runs(out, "delivery-wasm-100")

    def row(what, ours, theirs, keys, digits=0):
        a, b = med(ours, *keys), med(theirs, *keys)
        ratio = f"{a / b:.2f}" if a and b else "-"
        return [what, med_runs(ours, keys, digits), med_runs(theirs, keys, digits), ratio]

    rows = [
        row("RSS KiB per idle connection", ours_density, density, ("rss_kib_per_connection",), 1),
        row("PSS KiB per idle connection", ours_density, density, ("pss_kib_per_connection",), 1),
        row(f"connects /s ({inflight} in flight)", ours_storm, storm, ("connect_rate_per_sec",)),
        row("connect p99 ms", ours_storm, storm, ("connect_ms", "p99"), 2),
        row("delivered /s (100 %)", ours_delivery, delivery, ("events_per_sec",)),
        row("delivery p99 ms (100 %)", ours_delivery, delivery, ("latency_ms", "p99"), 2),
    ]
    cpu_rows = []
    for name, reports in (("gateway", ours_delivery), ("Node.js ws", delivery)):
        values = [cpu_us_per_event(r) for r in reports]
        values = [v for v in values if v is not None]
        cpu_rows.append(f"{name} {num(median(values), 1) if values else '-'}")
    return "\n".join([
        "## 8. Peer: a Node.js ws server, same load generator, same run",
        "",
        "`tests/bench/peers/node-ws/server.mjs`: the hand-written server this product replaces "
        "(one process, every user's sockets in one shared map, no sandbox), speaking the same "
        "protocol (JWT on connect, `welcome`, batch publish, per-user `seq`, the reference "
        "handler's redaction), run with the same loadgen arguments as the gateway's own runs "
        "above: the largest fixed density point, the storm at the middle in-flight cap, delivery at 100 %. "
        "*ratio* is gateway / Node.js. Server CPU µs per delivered event: "
        + ", ".join(cpu_rows) + ".",
        "",
        table(["", "gateway", "Node.js ws", "ratio"], rows),
    ]) + "\n"


def histogram_quantiles(path, name, qs, label=None):
    """Quantiles (upper bucket bounds, seconds) of a Prometheus histogram in a /metrics dump,
    and its count; (None..., 0) when absent. `label` (e.g. 'op="publish"') picks one series."""
    buckets = []
    try:
        text = open(path).read()
    except OSError:
        return [None for _ in qs], 0
    for line in text.splitlines():
        m = re.match(rf'^{name}_bucket{{([^}}]*)}} (\S+)$', line)
        if not m:
            continue
        pairs = m.group(1).split(",")
        le = next((p[4:-1] for p in pairs if p.startswith("le=")), None)
        others = [p for p in pairs if not p.startswith("le=")]
        if le is None or others != ([label] if label else []):
            continue
        buckets.append((float("inf") if le == "+Inf" else float(le), float(m.group(2))))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out = []
    for q in qs:
        out.append(next((le for le, c in buckets if total and c >= q * total), None))
    return out, int(total)


def metric_files(out, prefix):
    return sorted(glob.glob(os.path.join(out, f"{prefix}-r*.metrics")), key=lambda p: run_number(p[:-8] + ".json"))


def cluster_section(out, findings):
    embedded = runs(out, "cluster-embedded")
    one = runs(out, "cluster-1node")
    two = runs(out, "cluster-2node-a") + runs(out, "cluster-2node-b")
    if not (embedded or one or two):
        return "## 10. Cluster mode (NATS JetStream)\n\nNot run.\n"
    def row(name, reports):
        return [
            name,
            med_runs(reports, "events_published_per_sec"),
            med_runs(reports, "events_per_sec"),
            med_runs(reports, ("latency_ms", "p50"), 2),
            med_runs(reports, ("latency_ms", "p99"), 2),
            num(sum_of(reports, "losses")),
            num(sum_of(reports, "misdeliveries")),
            num(sum_of(reports, "publish_errors")),
            num(cpu(reports, "server", "publish")),
        ]
    steady_embedded = runs(out, "cluster-steady-embedded")
    steady_one = runs(out, "cluster-steady-1node")
    rows = [row("embedded log, 1 gateway", embedded),
            row("cluster, 1 gateway", one),
            row("cluster, 2 gateways (per gateway, cross-node)", two)]
    if steady_embedded or steady_one:
        offered = med(steady_embedded or steady_one, "publish_rate_target")
        rows += [row(f"equal load ({num(offered)}/s offered): embedded log", steady_embedded),
                 row(f"equal load ({num(offered)}/s offered): cluster, 1 gateway", steady_one)]
    base = med(embedded, "events_per_sec")
    base_p99 = med(embedded, "latency_ms", "p99")
    ratios = []
    for label, reports in (("1 gateway", one), ("2 gateways, per gateway", two)):
        rate = med(reports, "events_per_sec")
        p99 = med(reports, "latency_ms", "p99")
        if base and rate:
            ratios.append(f"- cluster mode, {label}: {num(rate / base * 100, 1)} % of the embedded "
                          f"delivery rate; p99 {num(p99, 2)} ms against {num(base_p99, 2)} ms "
                          f"(target: within 20 %: {verdict(rate >= 0.8 * base)}; at saturation, "
                          "with nats-server on the same 2 cores; equal load below, and on 16 "
                          "cores in tests/bench/cores.md)")
    steady_base = med(steady_embedded, "events_per_sec")
    steady_rate = med(steady_one, "events_per_sec")
    if steady_base and steady_rate:
        ratios.append(
            f"- cluster mode, 1 gateway, at equal load (a quarter of the embedded maximum): "
            f"{num(steady_rate / steady_base * 100, 1)} % of the embedded delivery rate; p99 "
            f"{num(med(steady_one, 'latency_ms', 'p99'), 2)} ms against "
            f"{num(med(steady_embedded, 'latency_ms', 'p99'), 2)} ms (target: within 20 %: "
            f"{verdict(steady_rate >= 0.8 * steady_base)})")
    findings["cluster_ratio"] = (med(one, "events_per_sec") or 0) / base if base else None
    storm_embedded = med(runs(out, "resume"), "storm_secs")
    storm_cluster = med(runs(out, "cluster-resume"), "storm_secs")
    if storm_embedded and storm_cluster:
        findings["cluster_resume_factor"] = storm_cluster / storm_embedded
    acks = []
    for prefix in ("cluster-1node", "cluster-2node-a", "cluster-2node-b", "cluster-steady-1node"):
        for path in metric_files(out, prefix):
            (p50, p99, p999), count = histogram_quantiles(
                path, "gateway_nats_round_trip_seconds", (0.5, 0.99, 0.999), label='op="publish"')
            lag, lag_count = histogram_quantiles(path, "gateway_cluster_lag_seconds", (0.5, 0.99))
            if count:
                acks.append([os.path.basename(path)[:-8], num(count),
                             num(p50 * 1000 if p50 else None, 3), num(p99 * 1000 if p99 else None, 3),
                             num(p999 * 1000 if p999 else None, 3),
                             num(lag[0] * 1000 if lag[0] else None, 3),
                             num(lag[1] * 1000 if lag[1] else None, 3)])
    resumes = runs(out, "cluster-resume")
    embedded_resumes = runs(out, "resume")
    resume_rows = []
    for name, reports in (("embedded log", embedded_resumes), ("JetStream", resumes)):
        if reports:
            resume_rows.append([name, med_runs(reports, "recovered"), med_runs(reports, "failures"),
                                med_runs(reports, "storm_secs", 2), med_runs(reports, ("recover_ms", "p50"), 1),
                                med_runs(reports, ("recover_ms", "p99"), 1)])
    first = (one or embedded or two)[0]
    text = [
        "## 10. Cluster mode (NATS JetStream)",
        "",
        f"One nats-server 2.15 with JetStream (file storage) on the same machine. Each run: "
        f"{first.get('connections_requested', 0):,} connections of {first.get('users', 0):,} users per gateway, "
        "batches of 100 published as fast as they are taken. *embedded*: one gateway with the "
        "in-process log; *cluster, 1 gateway*: the same with the stream (publish, then the "
        "node's feeds bring each event back); *cluster, 2 gateways*: each gateway holds half "
        "the users and its load generator publishes to the other gateway, so every event "
        "crosses nodes through the stream. nats-server, the gateways and the load generators "
        "share the 2 cores.",
        "",
        table(["mode", "published /s", "delivered /s", "p50 ms", "p99 ms", "losses",
               "misdeliveries", "publish errors", "server CPU %"], rows),
        "",
        *ratios,
        "",
        "Publish acknowledgement (the gateway's `gateway_nats_round_trip_seconds{op=\"publish\"}`, "
        "from sending an event to the stream's answer; batch events are sent together) and "
        "lag (`gateway_cluster_lag_seconds`, from the publishing node sending an event to a node "
        "queueing it to its sessions), upper bucket bounds:",
        "",
        table(["run", "acks", "ack p50 ms", "ack p99 ms", "ack p99.9 ms", "lag p50 ms", "lag p99 ms"], acks)
        if acks else "No publish acknowledgements recorded.",
        "",
        "Resume storm (the `resume` scenario's storm), from the embedded log and from JetStream "
        "(each resume: the user's head and earliest from the stream, then its missed events "
        "from the events the node's live subscription carried lately when they provably hold "
        "all of them, else one batched direct get from `since`; 64 reads at a time per node, "
        "the rest queued):",
        "",
        table(["log", "recovered", "failures", "storm s", "p50 ms", "p99 ms"], resume_rows)
        if resume_rows else "Not run.",
    ]
    from_memory = [
        (counter_value(path, "gateway_cluster_recent_reads_total"),
         counter_value(path, 'gateway_nats_round_trip_seconds_count{op="batch"}'))
        for path in metric_files(out, "cluster-resume")
    ]
    if from_memory:
        text += [
            "",
            "Reads answered from memory (`gateway_cluster_recent_reads_total`) and from the "
            "stream (batched direct gets), per run: "
            + ", ".join(f"{num(m)} and {num(b)}" for m, b in from_memory) + ".",
        ]
    return "\n".join(text) + "\n"


def counter_value(path, series):
    """The value of one series (name with its labels, as rendered) in a metrics scrape; 0
    when absent."""
    try:
        for line in open(path):
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
    except (OSError, ValueError):
        pass
    return 0


def read_smaps(path):
    """VMAs of a /proc/<pid>/smaps copy: (start, end, perms, name, {field: KiB})."""
    vmas = []
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    for line in lines:
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        if m:
            vmas.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4), {}))
        elif vmas and ":" in line:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                vmas[-1][4][key] = int(value.split()[0])
    return vmas


def memory_parts(smaps_path, status_path):
    """Resident KiB by where it is: guest linear memories (the shared image pages mapped into
    each, and private pages), the allocator's heap, page tables, the rest."""
    vmas = read_smaps(smaps_path)
    if vmas is None:
        return None
    vmas.sort()
    # A linear memory's accessible part is a run of contiguous read-write VMAs holding the
    # memfd image of the guest's data segment (wasmtime maps it copy-on-write into each
    # instance), between the inaccessible rest of reservations.
    in_memory = [False] * len(vmas)
    i = 0
    while i < len(vmas):
        j = i
        while (j + 1 < len(vmas) and vmas[j + 1][0] == vmas[j][1]
               and vmas[j][2].startswith("rw") and vmas[j + 1][2].startswith("rw")):
            j += 1
        if any("wasm-memory-image" in v[3] for v in vmas[i:j + 1]):
            for k in range(i, j + 1):
                in_memory[k] = True
        i = j + 1
    parts = {"image": 0, "linear": 0, "heap": 0, "other": 0}
    for v, lm in zip(vmas, in_memory):
        rss, anon = v[4].get("Rss", 0), v[4].get("Anonymous", 0)
        if lm:
            parts["linear"] += anon
            parts["image"] += rss - anon
        elif v[2].startswith("rw") and (v[3] in ("", "[heap]")):
            parts["heap"] += rss
        else:
            parts["other"] += rss
    try:
        status = open(status_path).read()
        parts["page_tables"] = int(re.search(r"VmPTE:\s+(\d+)", status).group(1))
    except (OSError, AttributeError):
        parts["page_tables"] = None
    return parts


def memory_breakdown(out, label, n):
    """KiB per connection by part: idle minus before, over n connections."""
    d = os.path.join(out, label)
    before = memory_parts(os.path.join(d, "before.smaps"), os.path.join(d, "before.status"))
    idle = memory_parts(os.path.join(d, "idle.smaps"), os.path.join(d, "idle.status"))
    if not before or not idle or not n:
        return None
    return {k: (idle[k] - before[k]) / n if idle[k] is not None and before[k] is not None else None
            for k in idle}


def hibernate_section(out, findings):
    # The fixed point (10,000; smaller in quick runs) first, then the most one process admits.
    sizes = sorted(
        {m.group(1) for p in glob.glob(os.path.join(out, "hibernate-idle-*-r*.json"))
         if (m := re.match(r"hibernate-idle-(\w+)-r", os.path.basename(p)))},
        key=lambda name: (name == "max", int(name) if name.isdigit() else 0),
    )
    idle = {name: runs(out, f"hibernate-idle-{name}") for name in sizes}
    if not any(idle.values()):
        return "## 9. Hibernation\n\nNot run.\n"
    live = {name: runs(out, f"hibernate-live-{name}") for name in idle}
    peer = runs(out, "peer-density")
    rows = []
    for name, reports in idle.items():
        if not reports:
            continue
        n = med(reports, "connections_established")
        a, b = med(reports, "rss_kib_per_connection"), med(live[name], "rss_kib_per_connection")
        rows.append([
            f"{num(n)} idle connections",
            med_runs(reports, "rss_kib_per_connection", 1),
            med_runs(live[name], "rss_kib_per_connection", 1),
            f"{b / a:.1f}x" if a and b else "-",
            med_runs(reports, "pss_kib_per_connection", 1),
            med_runs(reports, "wait_metric_secs", 1),
        ])
    first = next(iter(r for r in idle.values() if r))
    findings["hibernated_rss"] = med(first, "rss_kib_per_connection")
    findings["peer_rss"] = med(peer, "rss_kib_per_connection")
    findings["hibernated_n"] = med(first, "connections_established")

    wakes = []
    for path in sorted(glob.glob(os.path.join(out, "hibernate-blend-r*.metrics"))):
        (p50, p99), count = histogram_quantiles(path, "gateway_wake_seconds", (0.5, 0.99))
        wakes.append((p50, p99, count))
    wake_p99 = median([w[1] for w in wakes if w[1] is not None])
    findings["wake_p99_ms"] = wake_p99 * 1000 if wake_p99 is not None else None
    wake_text = ", ".join(
        f"p50 <= {num(w[0] * 1e6)} µs, p99 <= {num(w[1] * 1e6)} µs over {num(w[2])} wakes"
        for w in wakes if w[0] is not None
    ) or "no wakes recorded"

    blend = runs(out, "hibernate-blend")
    blend_live = runs(out, "hibernate-blend-live")
    blend_peer = runs(out, "hibernate-blend-peer")
    brows = []
    for what, reports in (("gateway, hibernation on", blend), ("gateway, hibernation off", blend_live),
                          ("Node.js ws peer", blend_peer)):
        if not reports:
            continue
        brows.append([
            what,
            med_runs(reports, "rss_kib_per_connection_publishing", 1),
            med_runs(reports, "events_per_sec"),
            med_runs(reports, ("latency_ms", "p50"), 2),
            med_runs(reports, ("latency_ms", "p99"), 2),
            med_runs(reports, "losses"),
        ])
    parts_rows = []
    fixed = sizes[0] if sizes else None
    if fixed:
        def parts_of(kind, reports):
            values = [memory_breakdown(out, f"smaps-{kind}-{fixed}-r{i + 1}",
                                       get(r, "connections_established"))
                      for i, r in enumerate(reports)]
            return [v for v in values if v]
        live_parts = parts_of("live", live[fixed])
        idle_parts = parts_of("idle", idle[fixed])
        names = [
            ("image", "guest data segment image, shared pages mapped into each instance "
                      "(RSS counts them per instance; PSS does not)"),
            ("linear", "guest linear memory, private pages (stack, heap, written data)"),
            ("page_tables", "page tables (VmPTE, not in RSS)"),
            ("heap", "allocator heap: wasmtime's per-instance structures, the session, "
                     "its socket buffers and queues"),
            ("other", "the rest (code, libraries)"),
        ]
        if live_parts or idle_parts:
            for key, what in names:
                parts_rows.append([
                    what,
                    num(median([p[key] for p in live_parts]), 1),
                    num(median([p[key] for p in idle_parts]), 1),
                ])
    active = get(blend[0], "active_users") if blend else None
    users = get(blend[0], "users") if blend else None
    hib = findings.get("hibernated_rss")
    return "\n".join([
        "## 9. Hibernation: idle connections without an instance",
        "",
        "`limits.hibernate_after_secs = 2`: memory sampled once `/metrics` shows every session "
        "hibernated (*wait*: seconds from the last connect until then), against the same "
        "connections with hibernation off (live instances), alternating. The Node.js peer "
        f"holds an idle connection in {med_runs(peer, 'rss_kib_per_connection', 1)} KiB "
        "(section 8). Target: <= "
        f"{TARGET_HIBERNATED_RSS_KIB} KiB RSS per hibernated connection: "
        f"{verdict(hib <= TARGET_HIBERNATED_RSS_KIB if hib is not None else None)}.",
        "",
        table(["", "RSS KiB/conn hibernated", "RSS KiB/conn live", "live / hibernated",
               "PSS KiB/conn hibernated", "wait s"], rows),
        "",
        f"Where a connection's memory goes at {num(int(fixed)) if fixed and fixed.isdigit() else '-'} "
        "connections (from `/proc/<pid>/smaps` and `status` copied before connecting and once "
        "idle, the difference over the connections, median of the runs):",
        "",
        table(["", "KiB/conn live", "KiB/conn hibernated"], parts_rows) if parts_rows else "Not measured.",
        "",
        f"**Wake-up** (a fresh instance and `restore`, the gateway's `gateway_wake_seconds`, "
        f"bucket bounds): {wake_text}. Target p99 <= {TARGET_WAKE_P99_MS} ms: "
        f"{verdict(wake_p99 * 1000 <= TARGET_WAKE_P99_MS if wake_p99 is not None else None)}.",
        "",
        f"**90/10 blend**: {num(med(blend, 'connections_established'))} connections of "
        f"{num(users)} users; all hibernate, then the first {num(active)} users (10 % of the "
        "connections) get 10 events/s each for the publish phase, which keeps them awake; "
        "memory sampled halfway through (RSS KiB per connection over all connections), "
        "latency publish-to-receive of the active ones (their first event includes the "
        "wake-up).",
        "",
        table(["", "RSS KiB/conn", "delivered /s", "p50 ms", "p99 ms", "losses"], brows),
    ]) + "\n"


def identities_section(out, findings):
    """What one more identity costs a node: the same connections as one user each against
    five each, per mode; the cluster's figure less the embedded one is the feed's own."""
    title = "## 12. Cost per subscribed identity"
    pairs = {}
    for mode in ("cluster", "embedded"):
        grown = []
        for one, five in zip(runs(out, f"identities-{mode}-1"), runs(out, f"identities-{mode}-5")):
            kib = [get(r, "rss_kib_per_connection") for r in (one, five)]
            n = [get(r, "connections_established") for r in (one, five)]
            users = [get(r, "users") for r in (one, five)]
            if None in kib or None in n or None in users or users[0] == users[1]:
                continue
            grown.append((kib[0] * n[0] - kib[1] * n[1]) / (users[0] - users[1]))
        pairs[mode] = grown
    if not pairs["cluster"]:
        return f"{title}\n\nNot run.\n"
    cluster, embedded = median(pairs["cluster"]), median(pairs["embedded"])
    # The target's measure, as the figure it was filed with: what cluster mode adds.
    findings["cluster_kib_per_identity"] = cluster - embedded if embedded is not None else cluster
    rows = [[mode, num(median(v), 2), ", ".join(num(x, 2) for x in v)] for mode, v in pairs.items() if v]
    sample = (runs(out, "identities-cluster-1") or [{}])[0]
    lines = [
        title,
        "",
        f"{num(sample.get('connections_requested'))} hibernated connections on one gateway, as "
        "one user each and as five per user (so four fifths fewer identities); the RSS the "
        "gateway grew by, the difference over the identities more. In cluster mode each identity "
        "has a feed on the node; the embedded log's difference is what an identity costs the "
        "router and sessions anyway. Pairs from the same run; noise is a few hundred bytes.",
        "",
        table(["mode", "KiB per identity (median)", "per run"], rows),
    ]
    if embedded is not None:
        lines += ["", f"What cluster mode adds per identity (cluster less embedded: the feed, and "
                  f"the identity's count for cluster presence): {num(cluster - embedded, 2)} KiB."]
    return "\n".join(lines) + "\n"


def summarize(out):
    meta = load(os.path.join(out, "meta.json")) or {}
    capacity = meta.get("capacity")
    findings = {"density": {}, "storm": [], "delivery": {},
                "capacity": int(capacity) if str(capacity).isdigit() else None}
    sections = [
        density_section(out, meta, findings),
        multi_section(out, findings),
        storm_section(out, meta, findings),
        delivery_section(out, meta, findings),
        native_section(out, findings),
        resume_section(out),
        streams_section(out),
        control_section(out),
        sse_section(out),
        tls_section(out),
        startup_section(out),
        peer_section(out),
        hibernate_section(out, findings),
        cluster_section(out, findings),
        overload_section(out, findings),
        identities_section(out, findings),
    ]
    plot_data(out, findings)
    return "\n".join([
        machine_section(meta),
        targets_section(findings),
        issue23_section(findings),
        *sections,
        plots_section(),
        notes_section(out),
        server_logs_section(out),
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the benchmark's output directory (target/bench), or a JSON file with --line")
    parser.add_argument("-o", "--output", help="write the Markdown here (default: stdout)")
    parser.add_argument("--line", action="store_true", help="print one line about one loadgen JSON file")
    args = parser.parse_args()
    if args.line:
        report = load(args.out)
        if report is None:
            sys.exit(f"cannot read {args.out}")
        print(one_line(report))
        return
    text = summarize(args.out)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The figures of one `tests/bench/cores.sh` run: Wasm against native delivery on 8 cores, one
cluster node against the embedded log, and the resume storm from each log.

usage: cores_summary.py OUT_DIR [--json FILE] [--commit SHA]

Prints one line per figure and, with --json, writes them for `summarize.py`, which puts them
beside `make bench`'s own targets (tests/bench/cores.json is the committed copy of the last
run on a 16-core machine)."""

import argparse
import glob
import json
import os
import statistics
import sys

from summarize import load


def rate(path):
    report = load(path)
    return (report or {}).get("events_per_sec") or 0


def cpu_us(path):
    report = load(path) or {}
    cpu, delivered = report.get("server_cpu_percent_publish"), report.get("events_per_sec")
    return cpu * 1e4 / delivered if cpu and delivered else None


def pairs(out, a, b):
    """(a, b) delivered rates of the runs that alternated, matched by run number."""
    found = []
    for left in sorted(glob.glob(os.path.join(out, f"{a}-r*.json"))):
        right = left.replace(f"{os.sep}{a}-r", f"{os.sep}{b}-r")
        if rate(left) and rate(right):
            found.append((left, right))
    return found


def sandbox(out, mode):
    found = pairs(out, f"wasm{mode}", f"native{mode}")
    if not found:
        return None
    wasm = [rate(w) for w, _ in found]
    native = [rate(n) for _, n in found]
    return {
        "ratio": statistics.median(100 * w / n for w, n in zip(wasm, native)),
        "ratios": [round(100 * w / n, 1) for w, n in zip(wasm, native)],
        "wasm": statistics.median(wasm),
        "wasm_runs": wasm,
        "native": statistics.median(native),
        "native_runs": native,
        "wasm_us": statistics.median(cpu_us(w) for w, _ in found),
        "native_us": statistics.median(cpu_us(n) for _, n in found),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--json")
    parser.add_argument("--commit")
    parser.add_argument("--date")
    args = parser.parse_args()
    out, cluster = args.out, os.path.join(args.out, "cluster")
    summary = {"commit": args.commit, "date": args.date,
               "sandbox": sandbox(out, ""), "sandbox_no_admission": sandbox(out, "-bytes")}
    for key, label in (("sandbox", "admission on"), ("sandbox_no_admission", "admission off")):
        s = summary[key]
        if s:
            print(f"wasm/native on 8 cores ({label}): median ratio {s['ratio']:.1f} % "
                  f"(pairs {', '.join(f'{r:.1f}' for r in s['ratios'])}); wasm median {s['wasm']:,.0f}/s "
                  f"({s['wasm_us']:.2f} µs of gateway CPU per delivery), native median {s['native']:,.0f}/s "
                  f"({s['native_us']:.2f} µs)")
    found = pairs(cluster, "embedded", "cluster1")
    if found:
        ratios = [rate(c) / rate(e) for e, c in found]
        summary["cluster"] = {
            "ratio": statistics.median(ratios),
            "embedded": statistics.median(rate(e) for e, _ in found),
            "cluster": statistics.median(rate(c) for _, c in found),
            "embedded_us": statistics.median(cpu_us(e) for e, _ in found),
            "cluster_us": statistics.median(cpu_us(c) for _, c in found),
        }
        c = summary["cluster"]
        print(f"one cluster node on 4 cores: {100 * c['ratio']:.1f} % of the embedded log "
              f"({c['cluster']:,.0f} against {c['embedded']:,.0f} delivered/s; {c['cluster_us']:.2f} against "
              f"{c['embedded_us']:.2f} µs of gateway CPU per delivery)")
    two = [rate(p) for p in sorted(glob.glob(os.path.join(cluster, "cluster2[ab]-r1.json")))]
    if len(two) == 2 and summary.get("cluster"):
        summary["cluster_two_nodes"] = two
        print(f"two cluster nodes, every event crossing: {two[0]:,.0f} and {two[1]:,.0f} delivered/s "
              f"({100 * sum(two) / 2 / summary['cluster']['embedded']:.1f} % of embedded per node)")
    storm = {k: load(os.path.join(cluster, f"resume-{k}.json")) for k in ("embedded", "cluster")}
    if all(storm.values()):
        summary["resume"] = {k: {"secs": v["storm_secs"], "recovered": v["recovered"],
                                 "failures": v["failures"]} for k, v in storm.items()}
        e, c = storm["embedded"], storm["cluster"]
        print(f"resume storm: {c['storm_secs']:.2f} s from JetStream against {e['storm_secs']:.2f} s "
              f"embedded ({c['storm_secs'] / e['storm_secs']:.2f}x), recovered {c['recovered']} and "
              f"{e['recovered']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    if not summary["sandbox"] and not summary.get("cluster"):
        sys.exit("no results found")


if __name__ == "__main__":
    main()

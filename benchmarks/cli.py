"""The command line of ``python -m benchmarks``: parse the options, run, report."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import gf, peers, profile, reference, report, workload
from benchmarks.run import SCENARIOS, SYSTEMS, Bench, Options
from benchmarks.servers import servers


def parse(argv: list[str] | None) -> Options:
    """The command line of ``python -m benchmarks``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="govflow and its peers, side by side: drain, steady, scaling, publish,"
        " cluster; and govflow's approvals, growing backlogs and webhooks to a slow receiver.",
    )
    p.add_argument("--events", type=int, default=20_000, help="govflow's drain backlog")
    p.add_argument("--peer-events", type=int, help="the peers' drain backlog (default 1000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--notify-events", type=int, default=5_000, help="the notify backlog")
    p.add_argument(
        "--notify-host-concurrency", type=int, help="webhooks in flight to one host, per worker"
    )
    p.add_argument("--rate", type=float, default=1000.0, help="steady load, events/s")
    p.add_argument("--duration", type=float, default=30.0, help="govflow's steady load, s")
    p.add_argument(
        "--rates", default="1000,2000,4000", help="rates offered to govflow after its steady load"
    )
    p.add_argument("--rate-duration", type=float, default=10.0, help="how long each rate, s")
    p.add_argument("--peer-duration", type=float, default=10.0, help="the peers' steady load, s")
    p.add_argument("--processes", type=int, default=2, help="worker processes per system")
    p.add_argument("--scaling", default="1,2,4", help="govflow worker processes to scale over")
    p.add_argument("--cluster", default="1,3", help="govflow worker processes on the cluster")
    p.add_argument("--partitions", type=int, default=8, help="partitions on the cluster")
    p.add_argument(
        "--backlog", default="20000,100000,300000", help="backlog sizes, each on fresh servers"
    )
    p.add_argument(
        "--backlog-processes", default="1,2,4", help="worker processes to drain one backlog with"
    )
    p.add_argument(
        "--backlog-processes-events",
        type=int,
        help="that backlog's size (default: the middle of --backlog, the smaller of two)",
    )
    p.add_argument("--concurrency", type=int, default=2, help="govflow consumers per group")
    p.add_argument("--approvals", type=int, default=10_000, help="executions waiting, then decided")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--out", type=Path, default=Options.out)
    p.add_argument("--prefix", default="gfb", help="prefix of every Redis key the run makes")
    p.add_argument("--no-install", action="store_true", help="skip peers not installed")
    p.add_argument(
        "--budget", type=float, default=570.0, help="seconds for all runs after the first (0: none)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--profile", action="store_true", help="only a govflow drain, under py-spy")
    a = p.parse_args(argv)
    opts = Options(
        events=a.events,
        peer_events=a.peer_events or min(a.events, 1_000),
        runs=a.runs,
        rate=a.rate,
        duration=a.duration,
        peer_duration=a.peer_duration,
        processes=a.processes,
        scaling=[int(x) for x in a.scaling.split(",") if x],
        cluster=[int(x) for x in a.cluster.split(",") if x],
        backlog=[int(x) for x in a.backlog.split(",") if x],
        backlog_processes=[int(x) for x in a.backlog_processes.split(",") if x],
        backlog_processes_events=a.backlog_processes_events,
        notify_events=a.notify_events,
        notify_host_concurrency=a.notify_host_concurrency,
        rates=[float(x) for x in a.rates.split(",") if x],
        rate_duration=a.rate_duration,
        partitions=a.partitions,
        concurrency=a.concurrency,
        approvals=a.approvals,
        systems=[s for s in a.systems.split(",") if s],
        scenarios=[s for s in a.scenarios.split(",") if s],
        out=a.out,
        install=not a.no_install,
        prefix=a.prefix,
        profile=a.profile,
        budget=a.budget,
    )
    if a.quick:
        opts.rate, opts.duration, opts.peer_duration = 100.0, 2.0, 2.0
        # One worker process and a token warm-up: each process start costs seconds.
        opts.processes, opts.scaling, opts.warmup = 1, [1], 5
        opts.approvals = min(opts.approvals, opts.events)
        if a.backlog == p.get_default("backlog"):
            opts.backlog = [100, 300]
        if a.backlog_processes == p.get_default("backlog_processes"):
            # One process (the backlog's own run, reused) and one more, started for it.
            opts.backlog_processes = [1, 2]
        if a.notify_events == p.get_default("notify_events"):
            opts.notify_events = 100
        if a.rates == p.get_default("rates"):
            opts.rates, opts.rate_duration = [100.0, 200.0], 1.0
    unknown = set(opts.systems) - set(SYSTEMS) or set(opts.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown system or scenario: {', '.join(sorted(unknown))}")
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write summary.json, print the table, draw the plot."""
    opts = parse(argv)
    if opts.profile:
        return run_profile(opts)
    wanted = [s for s in opts.systems if s in peers.PEERS]
    if opts.install and wanted:
        peers.install(wanted)
    missing = [s for s in wanted if not peers.PEERS[s].installed()]
    opts.systems = [s for s in opts.systems if s not in missing]
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with servers() as found:
        bench = Bench(opts, found)
        if missing:
            bench.say(f"not installed, skipped: {', '.join(missing)}")
        gf.setup(found.database_url)
        for system in wanted:
            if system not in missing:
                workload.create_peer_schema(found.database_url, f"bench_{system}")
        if "reference" in opts.systems:
            workload.create_peer_schema(found.database_url, reference.SCHEMA)
        steps: dict[str, Callable[[], None]] = {
            "drain": bench.drain,
            "scaling": bench.scale,
            "cluster": bench.scale_on_cluster,
            "steady": bench.steady,
            "approvals": bench.resume_approvals,
            "backlog": bench.drain_backlogs,
            "notify": bench.notify,
        }
        if "publish" in opts.scenarios and "drain" not in opts.scenarios:
            steps["drain"] = bench.drain  # publish is measured on the drain's backlog
            opts.scenarios.append("drain")
        for name in ("drain", "steady", "scaling", "cluster", "approvals", "backlog", "notify"):
            if name in opts.scenarios:
                steps[name]()
        bench.load.append(os.getloadavg()[0])
        summary = report.summarize(bench, versions(opts.systems), time.monotonic() - started)
    report.write(summary, opts.out)
    return summary


def run_profile(opts: Options) -> dict[str, Any]:
    """One govflow drain with py-spy on each worker; write out/profile.txt."""
    if not profile.available():
        peers.install([])
    opts.out.mkdir(parents=True, exist_ok=True)
    for old in opts.out.glob("profile-*.raw"):
        old.unlink()
    with servers(preload=[profile.STATEMENTS]) as found:
        bench = Bench(opts, found)
        gf.setup(found.database_url)
        unwatched = profile.watch_statements(found.database_url)
        result = bench.govflow_drain(
            "prof", opts.events, opts.processes, wrap=profile.wrap(opts.out)
        )
        postgres = unwatched or profile.statements(found.database_url, opts.events)
    bench.say(f"profiled drain: {result['events_per_s']:.0f} events/s, cores {result['cores']}")
    text = profile.summarize(sorted(opts.out.glob("profile-*.raw"))) + "\n" + postgres
    (opts.out / "profile.txt").write_text(text)
    print(text)
    return result


def versions(systems: list[str]) -> dict[str, str]:
    """Each system's version."""
    found = {"govflow": gf.version()}
    for name in systems:
        if name == "reference":
            found[name] = "bare two hops"
        elif name != "govflow":
            found[name] = peers.PEERS[name].version()
    return found

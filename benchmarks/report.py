"""summary.json, the table, and the plot (drawn by the peers' interpreter, which has matplotlib)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmarks import backlog, notify, peers
from benchmarks.run import Bench


def _stats(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    if not values:
        return {}
    return {
        key: round(statistics.median(values), 1),
        f"{key}_min": round(min(values), 1),
        f"{key}_max": round(max(values), 1),
    }


def machine() -> dict[str, Any]:
    """Cores, memory and the CPU model of this machine."""
    memory_kb = 0
    model = platform.processor()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def best_peer(rates: dict[str, float]) -> tuple[dict[str, Any], float | None]:
    """The fastest peer of ``rates`` (events/s by system), and govflow's rate over its."""
    peer_rates = {s: r for s, r in rates.items() if s not in ("govflow", "reference")}
    if not peer_rates:
        return {"name": None, "events_per_s": None}, None
    best = max(peer_rates, key=lambda s: peer_rates[s])
    ratio = None
    if "govflow" in rates and peer_rates[best] > 0:
        ratio = round(rates["govflow"] / peer_rates[best], 2)
    return {"name": best, "events_per_s": peer_rates[best]}, ratio


def notify_summary(bench: Bench) -> dict[str, Any]:
    """The notify scenario: every system's webhook drain, and govflow beside the best peer."""
    runs = bench.results["notify"]
    systems: dict[str, Any] = {
        system: {
            "events": found[0]["events"],
            **_stats(found, "events_per_s"),
            "cores": found[len(found) // 2]["cores"],
            "runs": len(found),
        }
        for system, found in runs.items()
    }
    best, ratio = best_peer({s: d["events_per_s"] for s, d in systems.items()})
    opts = bench.opts
    return {
        # govflow's entry is there even when it was not run, as tools read it.
        "govflow": {"events": None, "cores": {}, "runs": 0},
        **systems,
        "best_peer": best,
        "ratio": ratio,
        "receiver_delay_ms": notify.DELAY_MS,
        "io_concurrency": notify.DEFAULTS.io_concurrency,
        "webhook_host_concurrency": (opts.notify_host_concurrency or notify.IN_FLIGHT),
        # The peers' jobs in flight per worker process (each one's I/O-bound configuration).
        "peer_in_flight": peers.IO_SLOTS,
    }


def summarize(bench: Bench, versions: dict[str, str], elapsed: float) -> dict[str, Any]:
    """Every figure of the run: medians with min and max, per scenario and system."""
    opts, res = bench.opts, bench.results
    drain: dict[str, Any] = {}
    for system, runs in res["drain"].items():
        drain[system] = {
            "events": runs[0]["events"],
            **_stats(runs, "events_per_s"),
            **_stats(runs, "seconds"),
            **_stats(runs, "wall_s"),
            "cores": runs[len(runs) // 2]["cores"],
            "sched": runs[len(runs) // 2].get("sched", {}),
            "runs": len(runs),
        }
        if system == "govflow":
            drain[system].update(_stats(runs, "peak_rss_mb"))
            drain[system]["batches"] = runs[len(runs) // 2].get("batches", {})
    drain["best_peer"], drain["ratio"] = best_peer({s: d["events_per_s"] for s, d in drain.items()})
    if "govflow" in drain and drain.get("reference", {}).get("events_per_s"):
        # The runs alternate, so both medians saw the same machine, loaded as it was.
        ratio = drain["govflow"]["events_per_s"] / drain["reference"]["events_per_s"]
        drain["govflow"]["reference_ratio"] = round(ratio, 3)
    steady = {
        system: {
            **_stats(runs, "p50_ms"),
            **_stats(runs, "p99_ms"),
            **_stats(runs, "max_ms"),
            **_stats(runs, "offered_per_s"),
            "events": runs[0]["events"],
            "runs": len(runs),
        }
        for system, runs in res["steady"].items()
    }
    steady.update({system: {"skipped": why} for system, why in bench.skipped.items()})
    if gf_runs := res["steady"].get("govflow"):
        # p99 by offered rate, median over the rounds; the detail keeps p50 and max too.
        loads: dict[str, list[dict[str, Any]]] = {}
        for run in gf_runs:
            for rate, load in run.get("by_rate", {}).items():
                loads.setdefault(rate, []).append(load)
        steady["govflow"]["by_rate"] = {
            r: _stats(ls, "p99_ms")["p99_ms"] for r, ls in loads.items()
        }
        steady["govflow"]["by_rate_detail"] = {
            r: {**_stats(ls, "p50_ms"), **_stats(ls, "p99_ms"), **_stats(ls, "max_ms"),
                **_stats(ls, "offered_per_s"), "events": ls[0]["events"], "runs": len(ls)}
            for r, ls in loads.items()
        }  # fmt: skip
    publish = {system: {**_stats(runs, "events_per_s"), "runs": len(runs)}
               for system, runs in res["publish"].items()}  # fmt: skip
    scaling_detail = {
        str(p): {**_stats(runs, "events_per_s"), **_stats(runs, "peak_rss_mb"),
                 "cores": runs[len(runs) // 2]["cores"], "runs": len(runs)}
        for p, runs in sorted(bench.scaling.items())
        if p in opts.scaling or "scaling" not in opts.scenarios
    }  # fmt: skip
    cluster_detail = {
        str(p): {**_stats(runs, "events_per_s"), **_stats(runs, "balanced_s"),
                 **_stats(runs, "peak_rss_mb"), "cores": runs[len(runs) // 2]["cores"],
                 "runs": len(runs)}
        for p, runs in sorted(bench.cluster.items())
    }  # fmt: skip
    approvals = (
        {
            "govflow": {
                **_stats(bench.approvals, "resume_per_s"),
                **_stats(bench.approvals, "resume_p50_ms"),
                **_stats(bench.approvals, "resume_p99_ms"),
                **_stats(bench.approvals, "decide_per_s"),
                "waiting": bench.approvals[0]["waiting"],
                "via": bench.approvals[0]["via"],
                "runs": len(bench.approvals),
            }
        }
        if bench.approvals
        else {}
    )
    return {
        "drain": drain,
        "steady": steady,
        "approvals": approvals,
        "scaling": {
            "govflow": {p: d["events_per_s"] for p, d in scaling_detail.items()},
            "detail": {"govflow": scaling_detail},
        },
        "cluster": {
            "govflow": {p: d["events_per_s"] for p, d in cluster_detail.items()},
            "detail": {"govflow": cluster_detail},
            "topology": "3 primaries + 3 replicas, AOF on, one machine",
            "partitions": opts.partitions,
            "events": opts.events,
            "skipped": bench.cluster_skipped,
        },
        "backlog": {
            "govflow": {str(n): run for n, run in sorted(bench.backlog.items())},
            "retention": backlog.RETENTION,
            "processes": opts.processes,
            "by_processes": {str(p): run for p, run in sorted(bench.backlog_processes.items())},
            "by_processes_events": opts.backlog_by_processes() if bench.backlog_processes else None,
        },
        "notify": notify_summary(bench),
        "publish": publish,
        "versions": versions,
        "machine": {**machine(), "load_average_1m": [round(x, 2) for x in bench.load]},
        "servers": {
            "redis": bench.servers.redis_version,
            "postgres": bench.servers.postgres_version,
            "external": bench.servers.external,
            "settings": bench.servers.settings,
            "commit_timestamps": bench.commit_ts,
        },
        "options": {
            "events": opts.events,
            "peer_events": opts.peer_events,
            "runs": opts.runs,
            "rate": opts.rate,
            "duration_s": opts.duration,
            "peer_duration_s": opts.peer_duration,
            "processes": opts.processes,
            "concurrency": opts.concurrency,
            "peer_slots": {
                name: p.slots for name, p in peers.PEERS.items() if name in opts.systems
            },
            "scenarios": opts.scenarios,
            "budget_s": opts.budget,
        },
        "discarded_runs": bench.discarded,
        "cut_for_time": bench.cut,
        "elapsed_s": round(elapsed, 1),
    }


def _range(d: dict[str, Any], key: str, fmt: str = ",.0f") -> str:
    if key not in d:
        return "-"
    return escape(f"{d[key]:{fmt}} [{d[f'{key}_min']:{fmt}}-{d[f'{key}_max']:{fmt}}]")


def table(summary: dict[str, Any]) -> Table:
    """One row per system: the medians, [min-max] of the runs."""
    load = summary["machine"].get("load_average_1m", [])
    t = Table(
        title=escape("govflow and its peers (median [min-max])"),
        caption=f"load average (1 min) at start and end: {load}",
    )
    for column in ("system", "version", "drain events/s", "govflow / it", "publish events/s",
                   "steady p50 ms", "steady p99 ms", "steady max ms",
                   "notify events/s"):  # fmt: skip
        t.add_column(column, justify="left" if column in ("system", "version") else "right")
    drain, steady, publish = summary["drain"], summary["steady"], summary["publish"]
    notified = summary["notify"]
    gf_rate = drain.get("govflow", {}).get("events_per_s")
    for system, version in summary["versions"].items():
        d = drain.get(system, {})
        ratio = f"{gf_rate / d['events_per_s']:.1f}x" if gf_rate and d.get("events_per_s") else "-"
        s = steady.get(system, {})
        latency = (
            [_range(s, "p50_ms", ",.1f"), _range(s, "p99_ms", ",.1f"), _range(s, "max_ms", ",.0f")]
            if "skipped" not in s
            else [_why_not(s["skipped"]), "-", "-"]
        )
        t.add_row(
            system, version, _range(d, "events_per_s"),
            "1.0x" if system == "govflow" else ratio,
            _range(publish.get(system, {}), "events_per_s"), *latency,
            _range(notified.get(system, {}), "events_per_s"),
        )  # fmt: skip
    return t


def _why_not(skipped: str) -> str:
    """The cell of a steady load not run: overloaded, or not measured at all."""
    return "overloaded" if skipped.startswith("overloaded") else "not run"


def scaling_table(summary: dict[str, Any]) -> Table:
    """govflow's drain by worker processes."""
    t = Table(title=escape("govflow's drain by worker processes (median [min-max])"))
    for column in ("processes", "events/s", "peak RSS MiB / process", "cores busy"):
        t.add_column(column, justify="right")
    for p, d in summary["scaling"]["detail"]["govflow"].items():
        cores = ", ".join(f"{k} {v}" for k, v in d["cores"].items())
        t.add_row(p, _range(d, "events_per_s"), _range(d, "peak_rss_mb"), cores)
    return t


def cluster_table(summary: dict[str, Any]) -> Table:
    """govflow on the Redis Cluster by worker processes."""
    c = summary["cluster"]
    t = Table(
        title=escape(
            f"govflow on a Redis Cluster ({c['topology']}), {c['partitions']} partitions,"
            " by worker processes (median [min-max])"
        )
    )
    for column in ("processes", "events/s", "leases settled s", "cores busy"):
        t.add_column(column, justify="right")
    for p, d in c["detail"]["govflow"].items():
        cores = ", ".join(f"{k} {v}" for k, v in d["cores"].items())
        t.add_row(p, _range(d, "events_per_s"), _range(d, "balanced_s", ",.1f"), cores)
    return t


def backlog_table(summary: dict[str, Any]) -> Table:
    """govflow's drain by backlog size, each on fresh servers."""
    b = summary["backlog"]
    t = Table(
        title=escape(
            f"govflow's drain by backlog size ({b['processes']} worker processes, fresh servers"
            f" each; Redis MiB when published, drained, and back within {b['retention']:,}"
            " entries a stream)"
        )
    )
    for column in ("events", "events/s", "Postgres us/event", "peak RSS MiB", "Redis MiB",
                   "within retention after"):  # fmt: skip
        t.add_column(column, justify="right")
    for n, d in b["govflow"].items():
        t.add_row(
            f"{int(n):,}", f"{d['events_per_s']:,.0f}", str(d["postgres_us_per_event"]),
            str(d["peak_rss_mb"]), *_redis_cells(d),
        )  # fmt: skip
    return t


def _redis_cells(run: dict[str, Any]) -> tuple[str, str]:
    """A backlog drain's Redis MiB (published / drained / trimmed) and when it was trimmed."""
    mb, after = run["redis_mb"], run["trimmed_after_s"]
    memory = f"{mb['published']} / {mb['drained']} / {mb['trimmed']}"
    return memory, "-" if after is None else f"{after} s"


def backlog_processes_table(summary: dict[str, Any]) -> Table:
    """govflow's drain of one backlog size by worker processes, each on fresh servers."""
    b = summary["backlog"]
    t = Table(
        title=escape(
            f"govflow's drain of {b['by_processes_events']:,} events by worker processes (fresh"
            " servers each; Redis MiB when published, drained, and back within retention)"
        )
    )
    for column in ("processes", "events/s", "Postgres us/event",
                   "worker us/event, start-up in", "peak RSS MiB / worker", "Redis MiB", "within retention after"):  # fmt: skip
        t.add_column(column, justify="right")
    for p, d in b["by_processes"].items():
        t.add_row(
            p, f"{d['events_per_s']:,.0f}", str(d["postgres_us_per_event"]),
            str(d["worker_us_per_event"]), str(d["peak_rss_mb"]), *_redis_cells(d),
        )  # fmt: skip
    return t


def write(summary: dict[str, Any], out: Path, console: Console | None = None) -> None:
    """Write summary.json, print the tables, draw bench.png when matplotlib is at hand."""
    console = console or Console(width=160)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    console.print(table(summary))
    if summary["scaling"]["detail"]["govflow"]:
        console.print(scaling_table(summary))
    if summary["cluster"]["govflow"]:
        console.print(cluster_table(summary))
    if summary["backlog"]["govflow"]:
        console.print(backlog_table(summary))
    if summary["backlog"]["by_processes"]:
        console.print(backlog_processes_table(summary))
    d = summary["drain"]
    if d.get("ratio") is not None:
        console.print(
            f"govflow drains {d['govflow']['events_per_s']:,.0f} events/s,"
            f" {d['ratio']}x the best peer ({d['best_peer']['name']},"
            f" {d['best_peer']['events_per_s']:,.0f} events/s)"
        )
    n = summary["notify"]
    if n.get("ratio") is not None:
        console.print(
            f"govflow runs {n['govflow']['events_per_s']:,.0f} webhooks/s to a receiver answering"
            f" after {n['receiver_delay_ms']:.0f} ms, {n['ratio']}x the best peer"
            f" ({n['best_peer']['name']}, {n['best_peer']['events_per_s']:,.0f}/s)"
        )
    if a := summary["approvals"].get("govflow"):
        console.print(
            f"approvals: {a['waiting']:,} waiting executions resumed at"
            f" {_range(a, 'resume_per_s')}/s, latency p50 {_range(a, 'resume_p50_ms', ',.1f')}"
            f" ms, p99 {_range(a, 'resume_p99_ms', ',.1f')} ms (decisions through {a['via']},"
            f" {_range(a, 'decide_per_s')}/s)"
        )
    if (share := d.get("govflow", {}).get("reference_ratio")) is not None:
        console.print(
            f"govflow drains {100 * share:.0f} % of the reference's rate (the bare two-hop"
            f" pipeline, {d['reference']['events_per_s']:,.0f} events/s) in the same rounds"
        )
    for run in summary["discarded_runs"]:
        console.print(
            f"[bold]discarded[/bold] {run['system']} run {run['run']}: {run['error']};"
            f" the worker said: {run['worker_said']}",
            markup=True,
        )
    for cut in summary["cut_for_time"]:
        console.print(f"[bold]fewer runs[/bold] {cut}", markup=True)
    console.print(f"wrote {path}")
    if peers.PY.exists():
        plot = subprocess.run(
            [str(peers.PY), str(Path(__file__).with_name("plot.py")), str(path), str(out / "bench.png")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if plot.returncode == 0:
            console.print(f"wrote {out / 'bench.png'}")
        else:
            console.print(f"no plot: {plot.stderr.strip().splitlines()[-1:]}")

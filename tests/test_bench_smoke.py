"""The benchmark harness on a tiny input, so that it cannot rot (the benchmark is no test).

It runs govflow's drain, scaling, steady, publish, approvals, backlog (by size and by worker
processes) and notify scenarios and the reference's drain against the test servers, the
cluster scenario on a Redis Cluster of its own (1 and 3 workers over 8 partitions), plus
BullMQ's drain, steady and notify runs when ``benchmarks/.peers`` already has it (nothing is
installed here), and checks that ``summary.json`` holds the keys that tools read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers
from benchmarks.cli import main

pytestmark = pytest.mark.slow

KEYS = [
    "drain.govflow.events_per_s",
    "drain.best_peer.name",
    "drain.best_peer.events_per_s",
    "drain.ratio",
    "drain.reference.events_per_s",
    "drain.govflow.reference_ratio",
    "steady.govflow.p99_ms",
    "steady.govflow.by_rate",
    "notify.govflow.events_per_s",
    "notify.best_peer",
    "notify.ratio",
    "backlog.govflow",
    "backlog.by_processes",
    "scaling.govflow",
    "cluster.govflow",
    "cluster.partitions",
    "publish.govflow.events_per_s",
    "approvals.govflow.resume_per_s",
    "approvals.govflow.resume_p50_ms",
    "approvals.govflow.resume_p99_ms",
    "machine.cores",
    "versions.govflow",
]


def lookup(summary: dict[str, Any], dotted: str) -> Any:
    node: Any = summary
    for part in dotted.split("."):
        assert isinstance(node, dict), f"{dotted}: {part} is not inside a mapping"
        assert part in node, f"summary.json has no {dotted}"
        node = node[part]
    return node


def test_harness_writes_summary(
    redis_server_url: str,
    database_url: str,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOVFLOW_BENCH_REDIS_URL", redis_server_url)
    monkeypatch.setenv("GOVFLOW_BENCH_DATABASE_URL", database_url)
    cheap_peer = ["bullmq"] if peers.PEERS["bullmq"].installed() else []
    systems = ",".join(["govflow", "reference", *cheap_peer])
    argv = ["--events", "200", "--runs", "1", "--quick", "--no-install", "--systems", systems]
    main([*argv, "--out", str(tmp_path), "--prefix", prefix])

    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in KEYS:
        lookup(summary, key)
    drain = summary["drain"]["govflow"]
    assert drain["events"] == 200
    assert drain["events_per_s"] > 0
    assert drain["peak_rss_mb"] > 0
    assert set(summary["scaling"]["govflow"]) == {"1"}
    assert all(rate > 0 for rate in summary["scaling"]["govflow"].values())
    assert summary["steady"]["govflow"]["events"] == 200
    assert 0 < summary["steady"]["govflow"]["p50_ms"] <= summary["steady"]["govflow"]["p99_ms"]
    assert summary["publish"]["govflow"]["events_per_s"] > 0
    approvals = summary["approvals"]["govflow"]
    assert approvals["waiting"] == 200
    assert approvals["resume_per_s"] > 0
    assert 0 < approvals["resume_p50_ms"] <= approvals["resume_p99_ms"]
    assert summary["drain"]["reference"]["events"] == 200
    assert summary["drain"]["govflow"]["reference_ratio"] > 0
    assert "reference" not in summary["publish"]
    assert "skipped" in summary["steady"]["reference"]
    assert set(summary["steady"]["govflow"]["by_rate"]) == {"100", "200"}
    assert all(p99 > 0 for p99 in summary["steady"]["govflow"]["by_rate"].values())
    assert summary["notify"]["govflow"]["events"] == 100
    assert summary["notify"]["govflow"]["events_per_s"] > 0
    backlogs = summary["backlog"]["govflow"]
    assert set(backlogs) == {"100", "300"}
    for n, d in backlogs.items():
        assert d["events"] == int(n)
        assert d["events_per_s"] > 0
        assert d["redis_mb"]["published"] > 0
    # --quick drains the smaller size with 1 process (its own run, reused) and with 2.
    by_processes = summary["backlog"]["by_processes"]
    assert summary["backlog"]["by_processes_events"] == 100
    assert set(by_processes) == {"1", "2"}
    assert by_processes["1"] == backlogs["100"]
    for p, d in by_processes.items():
        assert d["processes"] == int(p)
        assert d["events"] == 100
        assert d["events_per_s"] > 0
        assert d["peak_rss_mb"] > 0
    cluster = summary["cluster"]["detail"]["govflow"]
    assert set(cluster) == {"1", "3"}
    assert all(d["events_per_s"] > 0 and d["balanced_s"] > 0 for d in cluster.values())
    if cheap_peer:
        assert summary["drain"]["best_peer"]["name"] == "bullmq"
        assert summary["drain"]["ratio"] > 0
        assert summary["notify"]["bullmq"]["events"] == 100
        assert summary["notify"]["best_peer"]["name"] == "bullmq"
        assert summary["notify"]["ratio"] > 0
    else:
        assert summary["drain"]["best_peer"]["name"] is None
        assert summary["notify"]["best_peer"]["name"] is None
        assert summary["notify"]["ratio"] is None

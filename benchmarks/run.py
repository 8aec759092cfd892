"""The scenarios: each system in turn, the order rotated every run, at least 3 runs each.

- drain: a backlog published before the workers start; events/s from the first execution
  row to the commit of the last completion (``workload.measure``). The reference
  (``benchmarks.reference``, the bare batched two-hop pipeline) drains the same backlog in
  the same rounds: the limit govflow's rate is a fraction of.
- steady: events offered at a fixed rate; latency from publish to the completion's commit.
  govflow's workers are then offered 2,000 and 4,000 events/s in turn, 10 s each (its p99
  by offered rate: ``by_rate``, whose 1,000 is the steady run itself).
- scaling: govflow's drain with 1, 2 and 4 worker processes.
- cluster: govflow on a 3-primary, 3-replica Redis Cluster over 8 partitions, drained by 1
  and by 3 worker processes (started first; the backlog goes in once their leases settle).
- publish: how fast the drain's backlog went in (``publish_many`` for govflow, each
  peer's own enqueue call: ``addBulk`` for BullMQ, one call per job for the others).
- approvals: govflow alone (no peer waits for a person): executions waiting on an
  approval, resumed by decisions; resume throughput and latency (``benchmarks.approvals``).
- backlog: govflow's drain of 20,000, 100,000 and 300,000 events, each on servers of its
  own (``benchmarks.backlog``): whether the cost of an event stays flat, and whether Redis
  memory comes back down after the drain; and the 100,000 drained by 1, 2 and 4 worker
  processes: whether a worker's peak RSS stays flat as the backlog is shared out.
- notify: every system's drain of events that each run a webhook to a receiver answering
  after 50 ms (``benchmarks.notify``); the peers' workers run with the concurrency each one
  recommends for I/O-bound jobs (``peers.Peer.io_worker``).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import (
    approvals,
    backlog,
    cpu,
    gf,
    notify,
    peers,
    profile,
    receiver,
    reference,
    workload,
)
from benchmarks.cluster import REDIS_CLI, REDIS_SERVER, running_cluster
from benchmarks.servers import Servers, free_port
from govflow.schemas.keys import Keys

SYSTEMS = ("govflow", "reference", "celery", "dramatiq", "taskiq", "bullmq")
SCENARIOS = ("drain", "steady", "scaling", "publish", "cluster", "approvals", "backlog", "notify")
# Each scenario's share of the time budget (``Bench._rounds``).
BUDGET_SHARES = {
    "drain": 0.35,
    "steady": 0.15,
    "scaling": 0.15,
    "cluster": 0.15,
    "approvals": 0.1,
    "notify": 0.1,
}
RETRIES = 3  # runs of a system discarded in a row, because a worker died, before giving up


@dataclass
class Options:
    """What to run, and how big."""

    events: int = 20_000
    peer_events: int = 1_000
    runs: int = 3
    rate: float = 1000.0
    duration: float = 30.0
    peer_duration: float = 10.0
    processes: int = 2
    scaling: list[int] = field(default_factory=lambda: [1, 2, 4])
    cluster: list[int] = field(default_factory=lambda: [1, 3])  # worker processes
    backlog: list[int] = field(default_factory=lambda: [20_000, 100_000, 300_000])  # events
    backlog_processes: list[int] = field(default_factory=lambda: [1, 2, 4])  # worker processes
    backlog_processes_events: int | None = None  # drained by each; None: the middle size
    notify_events: int = 5_000  # the notify scenario's backlog
    notify_host_concurrency: int | None = None  # None: as many as a peer (notify.IN_FLIGHT)
    rates: list[float] = field(default_factory=lambda: [1000.0, 2000.0, 4000.0])  # govflow
    rate_duration: float = 10.0  # seconds each of ``rates`` is offered
    partitions: int = 8  # on the cluster
    concurrency: int = 2  # `govflow run`'s default
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    out: Path = Path(__file__).resolve().parent / "out"
    install: bool = True
    prefix: str = "gfb"
    profile: bool = False
    warmup: int = 200  # events run through before a steady load, so that nothing starts cold
    approvals: int = 10_000  # executions waiting, then resumed by decisions
    budget: float = 570.0  # seconds; runs after a scenario's first stop when its share is spent

    def backlog_by_processes(self) -> int | None:
        """The backlog size drained with each of ``backlog_processes``; None: no size.

        The middle of ``backlog`` unless set (the smaller of two): large enough to outlast
        the workers' start-up, small enough that one process drains it in half a minute.
        """
        if self.backlog_processes_events is not None:
            return self.backlog_processes_events
        sizes = sorted(self.backlog)
        return sizes[(len(sizes) - 1) // 2] if sizes else None


Run = dict[str, Any]


class Bench:
    """Runs the scenarios against one pair of servers and keeps every run's figures."""

    def __init__(self, opts: Options, found: Servers) -> None:
        self.opts = opts
        self.servers = found
        self.results: dict[str, dict[str, list[Run]]] = {s: {} for s in SCENARIOS}
        self.scaling: dict[int, list[Run]] = {}
        self.cluster: dict[int, list[Run]] = {}  # runs on the Redis Cluster, by processes
        self.approvals: list[Run] = []  # govflow's runs of the approvals scenario
        self.backlog: dict[int, Run] = {}  # one drain per backlog size, on fresh servers
        self.backlog_processes: dict[int, Run] = {}  # one size's drain, by worker processes
        self.commit_ts = workload.commit_timestamps(found.database_url)
        self.tag = f"{opts.prefix}-{secrets.token_hex(3)}"
        self.load = [os.getloadavg()[0]]  # others' work on the machine skews the figures
        self.skipped: dict[str, str] = {}
        self.discarded: list[dict[str, str]] = []  # runs in which a worker died or stalled
        self.cut: list[str] = []  # scenarios that ran fewer rounds to keep within the budget
        self.started = time.monotonic()
        self.cluster_pids: list[int] = []  # the Redis Cluster's nodes, while it runs
        self.cluster_skipped: str | None = None  # why the cluster scenario did not run
        self.logs = opts.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def say(self, text: str) -> None:
        """One progress line."""
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- the servers' CPU, to tell where a run's time went -----------------------------

    def _server_cpu(self) -> dict[str, float]:
        used = {name: cpu.tree_cpu(pid) for name, pid in self.servers.pids.items()}
        if self.cluster_pids:
            used["redis_cluster"] = sum(cpu.tree_cpu(pid) for pid in self.cluster_pids)
        return used

    def _cores(
        self, before: dict[str, float], after: dict[str, float], workers: float, seconds: float
    ) -> dict[str, float]:
        """Cores busy from the workers' launch to the last completion, by who was busy."""
        used = {name: after[name] - before[name] for name in before}
        used["workers"] = workers
        return {k: round(v / seconds, 2) for k, v in used.items()} if seconds > 0 else {}

    # -- govflow -----------------------------------------------------------------------

    def govflow_drain(
        self,
        run: str,
        n: int,
        processes: int,
        wrap: Callable[[int], list[str]] | None = None,
        *,
        kind: str = "policy.created",
        make_env: Callable[[str, str, str], dict[str, str]] = gf.env,
    ) -> Run:
        """Publish a backlog of ``n`` events of type ``kind``, then drain it with
        ``processes`` workers, whose environment ``make_env(redis, db, prefix)`` makes."""
        db, prefix = self.servers.database_url, f"{self.tag}-{run}"
        workload.reset(db, "public")
        batch = gf.events(run, n, kind=kind)
        published_s = gf.publish(self.servers.redis_url, prefix, batch)
        env = make_env(self.servers.redis_url, db, prefix)
        before, started = self._server_cpu(), time.monotonic()
        ports = [free_port() for _ in range(processes)]
        procs = gf.start(
            processes, env, self.logs / f"govflow-{run}", self.opts.concurrency, wrap, ports
        )
        try:
            try:
                workload.wait_completed(
                    db, "public", n, like=f"{run}-%", alive=lambda: _alive(procs)
                )
            except workload.StalledError:
                self._dump(procs, run)
                raise
            wall = time.monotonic() - started
            worker_cpu = cpu.trees_cpu([p.pid for p in procs])
            after = self._server_cpu()
            batches = gf.batches(ports)
            sched = cpu.sched([p.pid for p in procs])
        finally:
            peaks = gf.stop(procs, wrapped=wrap is not None)
            gf.cleanup(self.servers.redis_url, prefix)
        result = workload.measure(db, "public", like=f"{run}-%", commit_ts=self.commit_ts)
        return {
            "events": result.events,
            "events_per_s": result.events_per_s,
            "seconds": result.seconds,
            "wall_s": wall,
            "publish_events_per_s": n / published_s,
            "peak_rss_mb": max(peaks) / 1024 if peaks else None,
            "cores": self._cores(before, after, worker_cpu, wall),
            "batches": batches,
            "sched": {**sched, "wall_s": round(wall * processes, 2)},
        }

    def govflow_steady(self, run: str) -> Run:
        """Offer ``rate`` events/s for ``duration`` s to running workers; then, to the same
        workers, each other rate of ``rates`` for ``rate_duration`` s (``by_rate``)."""
        db, prefix = self.servers.database_url, f"{self.tag}-{run}"
        n = int(self.opts.rate * self.opts.duration)
        workload.reset(db, "public")
        env = gf.env(self.servers.redis_url, db, prefix)
        procs = gf.start(
            self.opts.processes, env, self.logs / f"govflow-{run}", self.opts.concurrency
        )
        by_rate: dict[str, Run] = {}
        try:
            warm = f"{run}w"
            if self.opts.warmup:
                gf.publish(self.servers.redis_url, prefix, gf.events(warm, self.opts.warmup))
            workload.wait_completed(
                db, "public", self.opts.warmup, like=f"{warm}-%", alive=lambda: _alive(procs)
            )
            sent_s = gf.publish_paced(self.servers.redis_url, prefix, run, n, self.opts.rate)
            workload.wait_completed(db, "public", n, like=f"{run}-%", alive=lambda: _alive(procs))
            main = self._steady_result(run, n, sent_s)
            for rate in self.opts.rates:
                if rate == self.opts.rate:  # measured already, and for longer
                    by_rate[f"{rate:g}"] = main
                    continue
                load, m = f"{run}x{rate:g}", int(rate * self.opts.rate_duration)
                took_s = gf.publish_paced(self.servers.redis_url, prefix, load, m, rate)
                workload.wait_completed(
                    db, "public", m, like=f"{load}-%", alive=lambda: _alive(procs)
                )
                by_rate[f"{rate:g}"] = self._steady_result(load, m, took_s)
        finally:
            gf.stop(procs)
            gf.cleanup(self.servers.redis_url, prefix)
        return {**main, "by_rate": by_rate}

    def govflow_cluster(self, run: str, processes: int, cluster_url: str) -> Run:
        """Drain ``events`` spread over the cluster's partitions with ``processes`` workers.

        The workers start first and the backlog is published once their partition leases
        have settled, so the figure is what N workers carry, not how fast they rebalance;
        that is ``balanced_s``, from their launch to settled leases.
        """
        db, prefix, n = self.servers.database_url, f"{self.tag}-{run}", self.opts.events
        keys = Keys(prefix, self.opts.partitions)
        workload.reset(db, "public")
        env = gf.env(cluster_url, db, prefix, keys.partitions)
        launched = time.monotonic()
        procs = gf.start(processes, env, self.logs / f"govflow-{run}", self.opts.concurrency)
        try:
            gf.wait_balanced(cluster_url, keys, processes, alive=lambda: _alive(procs))
            balanced_s = time.monotonic() - launched
            pids = [p.pid for p in procs]
            before, started = self._server_cpu(), time.monotonic()
            idle_cpu = cpu.trees_cpu(pids)  # start-up and the wait for the leases
            published_s = gf.publish(cluster_url, prefix, gf.events(run, n), keys.partitions)
            workload.wait_completed(db, "public", n, like=f"{run}-%", alive=lambda: _alive(procs))
            wall = time.monotonic() - started
            worker_cpu = cpu.trees_cpu(pids) - idle_cpu
            after = self._server_cpu()
        finally:
            peaks = gf.stop(procs)
            gf.cleanup(cluster_url, prefix)
        result = workload.measure(db, "public", like=f"{run}-%", commit_ts=self.commit_ts)
        return {
            "events": result.events,
            "events_per_s": result.events_per_s,
            "seconds": result.seconds,
            "balanced_s": round(balanced_s, 2),
            "publish_events_per_s": n / published_s,
            "peak_rss_mb": max(peaks) / 1024 if peaks else None,
            "cores": self._cores(before, after, worker_cpu, wall),
        }

    def govflow_approvals(self, run: str) -> Run:
        """``approvals`` executions brought to wait, then resumed by decisions."""
        db, prefix = self.servers.database_url, f"{self.tag}-{run}"
        env = gf.env(self.servers.redis_url, db, prefix)
        return approvals.run_once(
            self.servers.redis_url,
            db,
            prefix,
            run,
            self.opts.approvals,
            lambda: gf.start(
                self.opts.processes, env, self.logs / f"govflow-{run}", self.opts.concurrency
            ),
            self.logs / f"govflow-{run}-serve.log",
            commit_ts=self.commit_ts,
        )

    # -- the reference -----------------------------------------------------------------

    def reference_drain(self, run: str, n: int) -> Run:
        """Publish govflow's backlog of ``n`` events, then drain it with the bare pipeline."""
        db, schema, prefix = self.servers.database_url, reference.SCHEMA, f"{self.tag}-{run}"
        workload.reset(db, schema)
        published_s = gf.publish(self.servers.redis_url, prefix, gf.events(run, n))
        env = reference.env(self.servers.redis_url, db, prefix)
        log = self.logs / f"reference-{run}"
        return self._drained(
            run, n, schema, prefix, published_s,
            lambda: reference.start(self.opts.processes, self.opts.concurrency, env, log),
        )  # fmt: skip

    # -- the peers ---------------------------------------------------------------------

    def peer_drain(self, peer: peers.Peer, run: str, n: int, webhook_url: str = "") -> Run:
        """Enqueue ``n`` first jobs, then drain them with the peer's worker processes.

        With ``webhook_url`` the jobs are the notify scenario's, each a webhook to that
        receiver, and the workers are configured for I/O-bound jobs.
        """
        db, schema, queue = self.servers.database_url, f"bench_{peer.name}", f"{self.tag}-{run}"
        workload.reset(db, schema)
        env = peer.env(self.servers.redis_url, db, schema, queue, webhook_url)
        enqueued = peer.produce(env, run, n, 0, "notify" if webhook_url else "drain")
        log = self.logs / f"{peer.name}-{run}"
        return self._drained(
            run, n, schema, queue, enqueued["seconds"],
            lambda: peer.start(self.opts.processes, env, log, io=bool(webhook_url)),
        )  # fmt: skip

    def _drained(
        self,
        run: str,
        n: int,
        schema: str,
        prefix: str,
        published_s: float,
        start: Callable[[], list[subprocess.Popen[bytes]]],
    ) -> Run:
        """Start the workers (``start``) on a published backlog of ``n``, wait until ``schema``
        shows it completed, stop them and clear the keys under ``prefix``; the figures."""
        db = self.servers.database_url
        before, started = self._server_cpu(), time.monotonic()
        procs = start()
        try:
            workload.wait_completed(db, schema, n, like=f"{run}-%", alive=lambda: _alive(procs))
            wall = time.monotonic() - started
            worker_cpu = cpu.trees_cpu([p.pid for p in procs])
            after = self._server_cpu()
            sched = cpu.sched([p.pid for p in procs])
        finally:
            peers.stop(procs)
            gf.cleanup(self.servers.redis_url, prefix)
        result = workload.measure(db, schema, like=f"{run}-%", commit_ts=self.commit_ts)
        return {
            "events": result.events,
            "events_per_s": result.events_per_s,
            "seconds": result.seconds,
            "wall_s": wall,
            "publish_events_per_s": n / published_s,
            "cores": self._cores(before, after, worker_cpu, wall),
            "sched": {**sched, "wall_s": round(wall * self.opts.processes, 2)},
        }

    def peer_steady(self, peer: peers.Peer, run: str) -> Run:
        """Offer ``rate`` first jobs/s for ``peer_duration`` s to running workers."""
        db, schema, queue = self.servers.database_url, f"bench_{peer.name}", f"{self.tag}-{run}"
        n = int(self.opts.rate * self.opts.peer_duration)
        workload.reset(db, schema)
        env = peer.env(self.servers.redis_url, db, schema, queue)
        procs = peer.start(self.opts.processes, env, self.logs / f"{peer.name}-{run}")
        try:
            warm = f"{run}w"
            if self.opts.warmup:
                peer.produce(env, warm, self.opts.warmup, 0)
            workload.wait_completed(
                db, schema, self.opts.warmup, like=f"{warm}-%", alive=lambda: _alive(procs)
            )
            sent = peer.produce(env, run, n, self.opts.rate)
            workload.wait_completed(db, schema, n, like=f"{run}-%", alive=lambda: _alive(procs))
        finally:
            peers.stop(procs)
            gf.cleanup(self.servers.redis_url, queue)
        return self._steady_result(run, n, float(sent["seconds"]), schema)

    def _steady_result(self, run: str, n: int, sent_s: float, schema: str = "public") -> Run:
        result = workload.measure(
            self.servers.database_url, schema, like=f"{run}-%", commit_ts=self.commit_ts
        )
        return {
            "events": result.events,
            "offered_per_s": n / sent_s if sent_s > 0 else 0.0,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "max_ms": result.max_ms,
        }

    # -- the scenarios -----------------------------------------------------------------

    def _dump(self, procs: list[subprocess.Popen[bytes]], run: str) -> None:
        """Write where each stalled worker is stuck (py-spy dump) next to its log."""
        if not profile.available():
            return
        for i, proc in enumerate(procs):
            out = subprocess.run(
                [str(profile.PY_SPY), "dump", "--pid", str(proc.pid)],
                capture_output=True, text=True, check=False, timeout=60,
            )  # fmt: skip
            (self.logs / f"govflow-{run}-{i}.stack").write_text(out.stdout + out.stderr)

    def _attempt(self, system: str, run: str, measure: Callable[[str], Run]) -> Run:
        """Run ``measure``; a run in which a worker died is discarded and run again.

        The death is kept, with the last line the worker wrote, for summary.json and the
        table: a crash is a finding, not noise.
        """
        for attempt in range(1 + RETRIES):
            name = run if attempt == 0 else f"{run}r{attempt}"
            try:
                return measure(name)
            except (workload.WorkerDiedError, workload.StalledError) as e:
                last = _last_lines(self.logs, f"{system}-{name}")
                self.discarded.append(
                    {"system": system, "run": name, "error": str(e), "worker_said": last}
                )
                self.say(f"{system} run {name} discarded: {e}; the worker said: {last}")
        raise RuntimeError(f"{system}: a worker died in {1 + RETRIES} runs in a row")

    def _rounds(self, scenario: str) -> Iterator[int]:
        """Round numbers of a scenario: the first always, more while its budget lasts.

        Each scenario may spend its share of ``budget`` (``BUDGET_SHARES``); after the
        first round, which always runs, another starts only if one as long as the longest
        so far still fits in that share.
        """
        share = BUDGET_SHARES[scenario] * self.opts.budget
        began, longest = time.monotonic(), 0.0
        for r in range(self.opts.runs):
            spent = time.monotonic() - began
            if r and self.opts.budget and spent + longest > share:
                self.cut.append(f"{scenario}: {r} of {self.opts.runs} runs (time budget)")
                self.say(f"{scenario}: stopping after {r} runs to keep within the time budget")
                return
            start = time.monotonic()
            yield r
            longest = max(longest, time.monotonic() - start)

    def _record(self, scenario: str, system: str, run: Run) -> None:
        self.results[scenario].setdefault(system, []).append(run)

    def _rotated(self, r: int) -> list[str]:
        systems = self.opts.systems
        k = r % len(systems)
        return systems[k:] + systems[:k]

    def drain(self) -> None:
        """The backlog drain, every system, alternating."""
        for r in self._rounds("drain"):
            for system in self._rotated(r):
                run = f"d{r}{system[:2]}"
                if system == "govflow":
                    result = self._attempt(
                        system,
                        run,
                        lambda name: self.govflow_drain(
                            name, self.opts.events, self.opts.processes
                        ),
                    )
                    self.scaling.setdefault(self.opts.processes, []).append(result)
                elif system == "reference":
                    result = self._attempt(
                        system,
                        run,
                        functools.partial(self.reference_drain, n=self.opts.events),
                    )
                else:
                    peer = peers.PEERS[system]
                    result = self._attempt(
                        system,
                        run,
                        functools.partial(self.peer_drain, peer, n=self.opts.peer_events),
                    )
                self._record("drain", system, result)
                if system != "reference":  # it publishes with govflow's publisher
                    self._record(
                        "publish", system, {"events_per_s": result["publish_events_per_s"]}
                    )
                self.say(
                    f"drain   {system:9} run {r + 1}: {result['events_per_s']:8.0f} events/s"
                    f" ({result['events']} in {result['seconds']:.2f} s; cores {result['cores']})"
                )

    def steady(self) -> None:
        """The steady load, every system, alternating.

        A peer whose drain could not keep up with the offered rate is not offered it: its
        latency would only grow with the length of the run, so the table says so instead.
        The reference is a limit on throughput, measured by its drain only.
        """
        for system in self.opts.systems:
            if system == "reference":
                self.skipped[system] = "the reference is measured by its drain only"
                continue
            drained = [r["events_per_s"] for r in self.results["drain"].get(system, [])]
            if system != "govflow" and drained and statistics.median(drained) < self.opts.rate:
                self.skipped[system] = (
                    f"overloaded: drains {statistics.median(drained):,.0f} events/s,"
                    f" below the {self.opts.rate:,.0f}/s offered"
                )
                self.say(f"steady  {system:9} skipped: {self.skipped[system]}")
        for r in self._rounds("steady"):
            for system in self._rotated(r):
                if system in self.skipped:
                    continue
                run = f"s{r}{system[:2]}"
                if system == "govflow":
                    result = self._attempt(system, run, self.govflow_steady)
                else:
                    peer = peers.PEERS[system]
                    result = self._attempt(system, run, functools.partial(self.peer_steady, peer))
                self._record("steady", system, result)
                by_rate = result.get("by_rate", {})
                others = [load for r, load in by_rate.items() if float(r) != self.opts.rate]
                for load in [result, *others]:
                    self.say(
                        f"steady  {system:9} run {r + 1}: p50 {load['p50_ms']:7.1f} ms,"
                        f" p99 {load['p99_ms']:8.1f} ms, max {load['max_ms']:8.1f} ms"
                        f" at {load['offered_per_s']:.0f}/s offered"
                    )

    def scale(self) -> None:
        """govflow's drain with 1, 2, 4 worker processes (the drain's own runs reused)."""
        for r in self._rounds("scaling"):
            counts = [p for p in self.opts.scaling if len(self.scaling.get(p, [])) <= r]
            for processes in counts[r % max(1, len(counts)) :] + counts[: r % max(1, len(counts))]:
                result = self._attempt(
                    "govflow",
                    f"c{r}p{processes}",
                    functools.partial(self.govflow_drain, n=self.opts.events, processes=processes),
                )
                self.scaling.setdefault(processes, []).append(result)
                self.say(
                    f"scaling govflow x{processes}  run {r + 1}:"
                    f" {result['events_per_s']:8.0f} events/s (peak RSS"
                    f" {result['peak_rss_mb']:.0f} MiB)"
                )

    def resume_approvals(self) -> None:
        """govflow's approvals scenario (the peers have nothing that waits for a person)."""
        if "govflow" not in self.opts.systems:
            return
        approvals.setup(self.servers.database_url)
        for r in self._rounds("approvals"):
            result = self._attempt("govflow", f"a{r}", self.govflow_approvals)
            self.approvals.append(result)
            self.say(
                f"approvals govflow run {r + 1}: {result['resume_per_s']:8.0f} resumed/s,"
                f" p50 {result['resume_p50_ms']:7.1f} ms, p99 {result['resume_p99_ms']:8.1f} ms"
                f" ({result['waiting']} waiting, decided at {result['decide_per_s']:.0f}/s)"
            )

    def drain_backlogs(self) -> None:
        """govflow's drain of each backlog size, then of one size by each process count.

        Every drain runs once, on servers of its own, outside the time budget: the three
        sizes take about three minutes, the 100,000 by 1 and 4 processes about one more.
        The drain at ``processes`` of a size already drained is not run twice.
        """
        if "govflow" not in self.opts.systems:
            return
        for n in self.opts.backlog:
            self.backlog[n] = self._drain_backlog(f"b{n}", n, self.opts.processes)
        size = self.opts.backlog_by_processes()
        if size is None:
            return
        for processes in self.opts.backlog_processes:
            if processes == self.opts.processes and size in self.backlog:
                self.backlog_processes[processes] = self.backlog[size]
            else:
                run = f"b{size}p{processes}"
                self.backlog_processes[processes] = self._drain_backlog(run, size, processes)

    def _drain_backlog(self, run: str, n: int, processes: int) -> Run:
        """Drain ``n`` events with ``processes`` workers on servers of their own."""
        result = self._attempt(
            "govflow",
            run,
            functools.partial(
                backlog.drain, n=n, processes=processes, concurrency=self.opts.concurrency,
                logs=self.logs, tag=self.tag,
            ),
        )  # fmt: skip
        self.say(
            f"backlog govflow {n:>7,} events x{processes}: {result['events_per_s']:8.0f}"
            f" events/s, Postgres {result['postgres_us_per_event']} us/event, peak RSS"
            f" {result['peak_rss_mb']} MiB, Redis {result['redis_mb']} MiB, within retention"
            f" {result['trimmed_after_s']} s after the drain"
        )
        return result

    def notify(self) -> None:
        """Every system's drain of events that each run a webhook to a slow receiver."""
        systems = [s for s in self.opts.systems if s != "reference"]  # it has no webhooks
        if not systems:
            return
        port = free_port()
        url = f"http://127.0.0.1:{port}/hook"
        proc = receiver.start(port, notify.DELAY_MS)
        try:
            if "govflow" in systems:
                notify.setup(self.servers.database_url, url)
            for r in self._rounds("notify"):
                for system in self._rotated(r):
                    if system == "reference":
                        continue
                    result = self._attempt(
                        system, f"n{r}{system[:2]}", self._notify_run(system, url)
                    )
                    self._record("notify", system, result)
                    self.say(
                        f"notify  {system:9} run {r + 1}: {result['events_per_s']:8.0f} events/s"
                        f" ({result['events']} webhooks answered after {notify.DELAY_MS:.0f} ms;"
                        f" cores {result['cores']})"
                    )
        finally:
            proc.kill()
            proc.wait()

    def _notify_run(self, system: str, url: str) -> Callable[[str], Run]:
        """How one run of the notify scenario is measured for ``system``."""
        if system == "govflow":
            return functools.partial(
                self.govflow_drain, n=self.opts.notify_events, processes=self.opts.processes,
                kind=notify.EVENT_TYPE, make_env=notify.env_for(self.opts.notify_host_concurrency),
            )  # fmt: skip
        return functools.partial(
            self.peer_drain, peers.PEERS[system], n=self.opts.notify_events, webhook_url=url
        )

    def scale_on_cluster(self) -> None:
        """govflow on a Redis Cluster (3 primaries, 3 replicas) with 1 and 3 workers."""
        if REDIS_SERVER is None or REDIS_CLI is None:
            self.cluster_skipped = "redis-server and redis-cli are not both installed"
            self.say(f"cluster: not run: {self.cluster_skipped}")
            return
        root = Path(tempfile.mkdtemp(prefix="gfb-cluster-"))
        with running_cluster(root) as cluster:
            self.cluster_pids = [n.process.pid for n in cluster.nodes if n.process is not None]
            try:
                for r in self._rounds("cluster"):
                    k = r % len(self.opts.cluster)
                    for processes in self.opts.cluster[k:] + self.opts.cluster[:k]:
                        result = self._attempt(
                            "govflow",
                            f"k{r}p{processes}",
                            functools.partial(
                                self.govflow_cluster, processes=processes, cluster_url=cluster.url
                            ),
                        )
                        self.cluster.setdefault(processes, []).append(result)
                        self.say(
                            f"cluster govflow x{processes}  run {r + 1}:"
                            f" {result['events_per_s']:8.0f} events/s (leases settled after"
                            f" {result['balanced_s']:.1f} s; cores {result['cores']})"
                        )
            finally:
                self.cluster_pids = []
                shutil.rmtree(root, ignore_errors=True)


def _last_lines(folder: Path, stem: str) -> str:
    """The last line of each log of a run's workers (a dead one's says why)."""
    lines = []
    for log in sorted(folder.glob(f"{stem}-*.log")):
        text = log.read_text(errors="replace").strip().splitlines()
        if text:
            lines.append(text[-1][:500])
    return " | ".join(lines)


def _alive(procs: list[subprocess.Popen[bytes]]) -> bool:
    return all(p.poll() is None for p in procs)

"""``python -m benchmarks --profile``: one govflow drain with py-spy on every worker.

py-spy (installed in the peers' venv) samples each worker process while it drains the
backlog, idle time excluded, and this module sums the samples by function (self and
inclusive) and by library, into ``out/profile.txt``. Findings belong in README.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchmarks import peers

PY_SPY = peers.VENV / "bin" / "py-spy"
RATE = 200  # samples per second
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def available() -> bool:
    """Whether py-spy is installed."""
    return PY_SPY.exists()


def wrap(out: Path) -> Callable[[int], list[str]]:
    """The py-spy command that runs worker N and writes its samples to out/profile-N.raw."""

    def command(i: int) -> list[str]:
        return [str(PY_SPY), "record", "--format", "raw", "--nonblocking", "--rate", str(RATE),
                "-o", str(out / f"profile-{i}.raw"), "--"]  # fmt: skip

    return command


def library(path: str) -> str:
    """Who a frame's file belongs to: a govflow package, a library, or the interpreter."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    for package in ("consumers", "db", "schemas", "ops", "producers"):
        if f"/{package}/" in path or path.startswith(f"{package}/"):
            return f"govflow {package}"
    if "/lib/python3" in path or path.startswith("<"):
        name = path.rsplit("/lib/python3.", 1)[-1].split("/", 1)[-1]
        return "stdlib " + name.split("/", 1)[0].removesuffix(".py")
    return path


def summarize(raws: list[Path], top: int = 30) -> str:
    """Self and inclusive sample counts by function, and self samples by library."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    total = 0
    for raw in raws:
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = []
            for frame in stack.split(";"):
                m = _FRAME.match(frame)
                if m:
                    frames.append((m["func"], m["file"]))
            if not frames:
                continue
            func, file = frames[-1]
            own[f"{func} ({file})"] += n
            libs[library(file)] += n
            for name in {f"{f} ({p})" for f, p in frames}:
                inclusive[name] += n
    if total == 0:
        return "no samples\n"
    lines = [
        f"{total} samples of busy (non-idle) worker time at {RATE} Hz",
        "",
        "self time by library:",
    ]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in libs.most_common(top)]
    lines += ["", "self time by function:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time by function:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"

"""A webhook receiver for the notify scenario: answers every POST with 200 after a delay.

``python -m benchmarks.receiver PORT DELAY_MS`` serves HTTP/1.1 with keep-alive on
127.0.0.1:PORT, in a process of its own (so it takes no CPU from the harness's event
loop), and writes one line, ``ready``, once it listens. Each request waits ``DELAY_MS``
before its answer, as a slow receiver would, without holding up the others.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            await reader.readexactly(length)
            await asyncio.sleep(delay_s)
            writer.write(_ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client closed the connection
    finally:
        writer.close()


async def main(port: int, delay_ms: float) -> None:
    """Serve until killed."""
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, delay_ms / 1000), "127.0.0.1", port, backlog=1024
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def start(port: int, delay_ms: float) -> subprocess.Popen[bytes]:
    """Start a receiver process; return once it listens.

    Raises:
        RuntimeError: it did not start.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.receiver", str(port), str(delay_ms)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready", or why not (empty: it exited)
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the webhook receiver did not start: {line!r}")
    return proc


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))

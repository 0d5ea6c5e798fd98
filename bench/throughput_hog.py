"""8 rooms on a busy box: the engine vs llama-server, without and with a CPU hog on one core.

The workload is bench/throughput.py's at 8 rooms (sides alternating round by
round). It runs twice against one llama-server: first on the box as it is,
then with a busy loop (``while True: pass`` in a child process pinned to core
0, started and stopped by its PID) taking one core. hog_ratio = (engine /
server with the hog) / (engine / server without it): 1.0 means the engine
degrades exactly as much as the peer, above 1.0 less.

Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import _llama_server as ls
import throughput as tp
from _common import emit, llama_cpp_build, log, model_path

from hivebridge.inference.local import EngineSettings

ROOMS = 8


@contextmanager
def hog(core: int = 0) -> Iterator[int]:
    """A busy loop on one core for the duration of the block; yields its PID."""
    cores = os.sched_getaffinity(0)
    pin = core if core in cores else min(cores)
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(proc.pid, {pin})
    log(f"hog started: pid {proc.pid} on core {pin}")
    try:
        yield proc.pid
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait()
        log(f"hog stopped: pid {proc.pid}")


async def main() -> None:
    binary, _number = tp.peer_binary()
    threads = EngineSettings().resolved_threads()[0]
    sides = ["engine", "server"]
    loads: dict[str, list[float]] = {}
    # A fresh server per phase (the engine is fresh too): the hog phase asks what the
    # calm phase asked, and a kept server would answer from its prompt cache.
    with ls.running(binary, model_path(), **tp.SERVER_ARGS, threads=threads) as server:
        calm = await tp.run_level(ROOMS, threads, server.url, sides)
    loads["calm"] = [round(x, 2) for x in os.getloadavg()]
    with hog(), ls.running(binary, model_path(), **tp.SERVER_ARGS, threads=threads) as server:
        busy = await tp.run_level(ROOMS, threads, server.url, sides)
        loads["hog"] = [round(x, 2) for x in os.getloadavg()]
    ratio_calm = calm["engine"] / calm["server"]
    ratio_hog = busy["engine"] / busy["server"]
    emit(
        {
            "rooms": ROOMS,
            "calm": {k: round(v, 2) for k, v in calm.items()},
            "hog": {k: round(v, 2) for k, v in busy.items()},
            "ratio_vs_server_8_calm": round(ratio_calm, 2),
            "ratio_vs_server_8_hog": round(ratio_hog, 2),
            "hog_ratio": round(ratio_hog / ratio_calm, 2),
            "engine_kept": round(busy["engine"] / calm["engine"], 2),
            "server_kept": round(busy["server"] / calm["server"], 2),
            "workload": f"{tp.TURNS} turns x {tp.MAX_TOKENS} tokens per room, 8 rooms",
            "threads": threads,
            "engine_llama_cpp": llama_cpp_build(),
            "server_llama_cpp": ls.server_build(binary),
            "load_average_phases": loads,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=tp.TURNS, help="questions per room")
    args = ap.parse_args()
    tp.TURNS = args.turns
    asyncio.run(main())

"""SIGTERM stops the bridge cleanly: its stop code runs and the process exits 0."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    import asyncio, os, signal
    from hivebridge.cli import run_until_signalled

    async def bridge() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # as `docker stop` would
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)  # stopping may await (close listeners, the db)
            print("stopped", flush=True)

    run_until_signalled(bridge())
    print("exited", flush=True)
    """
)


def test_sigterm_runs_the_stop_and_exits_zero() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["stopped", "exited"]

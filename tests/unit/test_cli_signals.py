"""SIGTERM stops the service cleanly: its stop code runs and the process exits 0."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from hivebridge.app import serve

    class Service:
        async def start(self) -> None:
            print("started", flush=True)
            if sys.argv[1] == "while-starting":
                os.kill(os.getpid(), signal.SIGTERM)  # as `docker stop` would
                await asyncio.Event().wait()  # a start that takes long
            else:
                asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)

        async def stop(self) -> None:
            await asyncio.sleep(0.05)  # stopping may await (close listeners, the db)
            print("stopped", flush=True)

    code = asyncio.run(serve(Service()))
    print("exited", code, flush=True)
    """
)


def run(when: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, when], capture_output=True, text=True, timeout=60
    )


def test_sigterm_runs_the_stop_and_exits_zero() -> None:
    done = run("running")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["started", "stopped", "exited", "0"]


def test_sigterm_during_the_start_cancels_it_and_exits_zero() -> None:
    done = run("while-starting")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["started", "exited", "0"]


RELOADING = textwrap.dedent(
    """
    import asyncio, os, signal
    from hivebridge.app import serve

    class Service:
        def __init__(self) -> None:
            self.reloads = 0

        async def start(self) -> None:
            print("started", flush=True)
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, os.kill, os.getpid(), signal.SIGHUP)
            loop.call_later(0.3, os.kill, os.getpid(), signal.SIGHUP)
            loop.call_later(0.6, os.kill, os.getpid(), signal.SIGTERM)

        async def reload(self) -> None:
            self.reloads += 1
            print("reloaded", self.reloads, flush=True)
            if self.reloads == 2:
                raise RuntimeError("a reload that fails")  # logged; the service runs on

        async def stop(self) -> None:
            print("stopped", flush=True)

    code = asyncio.run(serve(Service()))
    print("exited", code, flush=True)
    """
)


def test_sighup_reloads_and_the_service_keeps_running() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RELOADING], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [
        "started",
        "reloaded 1",
        "reloaded 2",
        "stopped",
        "exited 0",
    ]
    assert "Traceback" not in done.stderr


GRACEFUL = textwrap.dedent(
    """
    import asyncio, logging, os, signal
    from hivebridge.app import serve

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")

    class Service:
        def __init__(self) -> None:
            self.hurried = asyncio.Event()

        async def start(self) -> None:
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)

        def hurry(self) -> None:
            print("hurried", flush=True)
            self.hurried.set()

        async def stop(self) -> str:
            # A reply in flight; the second signal ends its grace.
            os.kill(os.getpid(), signal.SIGTERM)
            await self.hurried.wait()
            return "1 of 1 in flight finished"

    print("exited", asyncio.run(serve(Service())), flush=True)
    """
)


def test_a_second_signal_hurries_the_stop_and_one_line_is_logged() -> None:
    done = subprocess.run(
        [sys.executable, "-c", GRACEFUL], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == ["hurried", "exited 0"]
    lines = [line for line in done.stderr.splitlines() if line.startswith("hivebridge ")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("hivebridge hivebridge stopped on SIGTERM in ")
    assert lines[0].endswith(": 1 of 1 in flight finished")

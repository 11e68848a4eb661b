"""`bios serve` in a child process on a free loopback port, for tests that need a live server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m bios serve ARGS` with BIOS_HOME=`home` on a free port; `url` once started
    (`python_args` replaces `-m bios`, e.g. with `-c CODE` that adjusts the server, then runs
    `bios.cli.main()`).

    A context manager: entering waits until /healthz answers (or raises with the server's log),
    leaving stops it with SIGTERM. `kill()` sends SIGKILL (a crash), `start()` starts it again
    on the same port and home."""

    def __init__(
        self,
        home: str | Path,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        python_args: tuple[str, ...] = ("-m", "bios"),
    ) -> None:
        self.home, self.args, self.port, self.python_args = Path(home), args, port or free_port(), python_args
        self.env = {**os.environ, "BIOS_HOME": str(home), "OPENBLAS_NUM_THREADS": "1", **(env or {})}
        self.env.pop("BIOS_BASE_URL", None)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.home / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.python_args, "serve", "--port", str(self.port), *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bios serve exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"bios serve did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the server dies without any cleanup."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadedServer:
    """`bios.server.build(options)` served by uvicorn on a thread of this process, so a test can
    reach the engine behind it (`service.engine`). A context manager; `url` once entered."""

    def __init__(self, options) -> None:
        import dataclasses

        import uvicorn

        from bios.server import build

        self.options = dataclasses.replace(options, port=options.port if options.port != 8000 else free_port())
        self.app, self.service = build(self.options)
        self.url = f"http://127.0.0.1:{self.options.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.options.port, log_level="warning")
        )
        self._thread = None

    def __enter__(self) -> ThreadedServer:
        import threading

        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the threaded server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.service.close()
        self.service.engine.close()

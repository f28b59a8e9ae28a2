"""A throw-away Ray cluster on this machine for tests: a head and a worker node (two `ray start` processes).

Each node runs in its own process group, which is what stopping it kills: never `ray stop`, which would also
stop other people's Ray processes on a shared machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 2):
        self.nodes, self.cpus = nodes, cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.temp = tempfile.mkdtemp(
            prefix="rr-", dir="/tmp"
        )  # short: Ray's socket paths must stay < 108 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_bin = Path(sys.executable).with_name("ray")
        self.ray = str(ray_bin) if ray_bin.exists() else "ray"

    def _start(self, head: bool) -> None:
        ports = [
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--dashboard-agent-grpc-port",
            str(_free_port()),
            "--runtime-env-agent-port",
            str(_free_port()),
            "--metrics-export-port",
            str(_free_port()),
        ]
        if head:
            args = [
                "--head",
                f"--port={self.port}",
                "--ray-client-server-port",
                str(_free_port()),
                "--dashboard-port",
                str(_free_port()),
                "--include-dashboard=false",
                f"--temp-dir={self.temp}",
            ]
        else:
            args = [f"--address={self.address}"]
        cmd = [
            self.ray,
            "start",
            "--block",
            f"--num-cpus={self.cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            *ports,
            *args,
        ]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        log = open(Path(self.temp) / f"node{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the node
        self.procs.append(
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        )

    def start(self, timeout: float = 90.0) -> LocalCluster:
        self._start(head=True)
        self._wait(1, timeout)
        for _ in range(self.nodes - 1):
            self._start(head=False)
        self._wait(self.nodes, timeout)
        return self

    def _wait(self, nodes: int, timeout: float) -> None:
        probe = (
            "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Ray node exited; see the logs in {self.temp}")
            out = subprocess.run(
                [sys.executable, "-c", probe, self.address],
                capture_output=True,
                text=True,
                env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            )
            if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= nodes:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster did not come up within {timeout:.0f} s; logs in {self.temp}")

    def sessions(self) -> set[int]:
        return {p.pid for p in self.procs}

    def worker_pids(self, name: str) -> list[int]:
        """Pids of this cluster's Ray worker processes whose title contains ``name``."""
        groups, found = self.sessions(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if name in title and os.getsid(int(entry.name)) in groups:  # workers get groups of their own
                    found.append(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
        return found

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever of this node is left
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(self.temp, ignore_errors=True)  # Ray's session folders and the nodes' logs

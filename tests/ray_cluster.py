"""A local Ray cluster for tests: `ray start --head --block` on free ports, in a temp dir of its own, stopped by pid.

Token authentication (on by default for new local clusters since Ray 2.60) is off for this cluster and its
clients (`RAY_AUTH_MODE=disabled`), so nothing is written to ~/.ray. Stopping never uses `ray stop`, which
would stop every Ray cluster of the machine: it signals the processes this cluster started, by pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalRayCluster:
    """One head node with `num_cpus` CPUs and no GPU; `address` is its dashboard (job submission) URL."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        # Short: Ray's Unix sockets live under it and a socket path may not exceed 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port = _free_ports(4)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # the job's entrypoint `python` is this environment's, as a cluster's image has its own on PATH
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.process: subprocess.Popen | None = None
        self.pgid = -1
        self._family: dict[int, object] = {}

    def start(self, timeout: float = 180) -> LocalRayCluster:
        ray = Path(sys.executable).parent / "ray"
        command = [str(ray), "start", "--head", "--block", "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
                   "--temp-dir", str(self.temp_dir), "--port", str(self.gcs_port),
                   "--ray-client-server-port", str(self.client_port), "--dashboard-host", "127.0.0.1",
                   "--dashboard-port", str(self.dashboard_port), "--dashboard-agent-listen-port", str(self.agent_port),
                   "--include-dashboard", "true", "--disable-usage-stats"]
        self.log = (self.temp_dir / "ray-start.log").open("w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.pgid = self.process.pid  # a session of its own: its process group is its pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.temp_dir / 'ray-start.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as response:
                    if response.status == 200 and self._raylet_up():
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Ray dashboard did not answer within {timeout}s")

    def _raylet_up(self) -> bool:
        return any("raylet" in p.name() for p in self._ours())

    def _ours(self) -> list:
        """Every live process of this cluster: descendants of `ray start` (remembered, since orphans lose their
        parent), its process group (the agents keep it), and any naming its temp dir."""
        import psutil

        if self.process is not None:
            try:
                for child in psutil.Process(self.process.pid).children(recursive=True):
                    self._family.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
        found = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid == os.getpid():
                    continue
                mine = proc.pid in self._family and self._family[proc.pid].create_time() == proc.create_time()
                if mine or os.getpgid(proc.pid) == self.pgid or str(self.temp_dir) in " ".join(proc.info["cmdline"] or ()):
                    if proc.status() != psutil.STATUS_ZOMBIE:  # a zombie runs nothing; it only awaits its reaper
                        found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                pass
        return list(found.values())

    def running(self) -> list[str]:
        """The processes of this cluster that still run."""
        out = []
        for proc in self._ours():
            try:
                out.append(f"{proc.pid} {proc.name()}")
            except Exception:
                pass
        return out

    def stop(self, timeout: float = 10) -> list[str]:
        """Stop this cluster's processes by pid, as `ray stop --force` would but only ours: SIGKILL them all (a test
        cluster has nothing to save; its workers exit with their raylet), then again whatever appeared meanwhile.
        Returns what still runs afterwards (empty when all is gone)."""
        import psutil

        if self.process is None:
            return []
        for _ in range(5):
            procs = self._ours()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=timeout)
        self.process.wait()  # reap `ray start` itself
        self.log.close()
        left = self.running()
        self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

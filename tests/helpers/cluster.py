"""A throwaway multi-node Ray cluster and an S3-compatible server, both on 127.0.0.1, for tests/engine/test_cluster.py.

Nothing here may touch another Ray cluster on the machine: every port is our own, the nodes run with
``--block`` in process groups of their own, and they are ended by killing those groups (``ray stop`` would
stop every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

RAY = Path(sys.executable).with_name("ray")
# what s3fs needs besides the config's storage_options: a region, and no credential lookup on the
# instance-metadata address (169.254.169.254) when a client is made without keys
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before (the OS may hand one out twice)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


# ------------------------------------------------------------------ S3


class S3Server:
    """moto's S3 on a free loopback port (in a thread of this process); ``storage_options`` for s3fs."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": AWS_ENV["AWS_ACCESS_KEY_ID"],
                "secret": AWS_ENV["AWS_SECRET_ACCESS_KEY"]}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def __enter__(self) -> S3Server:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()


def s3_config(local_cfg: Path, dest: Path, replace: dict[str, str], storage_options: dict[str, Any]) -> Path:
    """``local_cfg`` with every source path, image root/dir and the output path re-pointed from each local
    prefix in ``replace`` to its s3:// URL, and ``storage_options`` on every source and the output."""
    import yaml

    def move(p: str) -> str:
        for local, url in replace.items():
            if p.startswith(local):
                return url + p[len(local):]
        return p

    raw = yaml.safe_load(local_cfg.read_text())
    for src in raw["sources"]:
        src["paths"] = [move(p) for p in src["paths"]]
        for k in ("image_root", "image_dir"):
            if k in src:
                src[k] = move(src[k])
        src["storage_options"] = dict(storage_options)
    raw["output"]["path"] = move(raw["output"]["path"])
    raw["output"]["storage_options"] = dict(storage_options)
    assert "s3://" in raw["output"]["path"] and all(p.startswith("s3://") for s in raw["sources"] for p in s["paths"])
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


# ------------------------------------------------------------------ Ray


def _node_ports(head: bool) -> list[str]:
    # every fixed default port moved: another cluster on this machine (the test session's own, another
    # engineer's) may hold them (dashboard agent 52365, ...)
    names = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port"]
    if head:
        names.append("ray-client-server-port")
    return [f"--{name}={free_port()}" for name in names]


class RayCluster:
    """``ray start --head`` plus ``nodes - 1`` x ``ray start --address``, each node with ``cpus`` CPUs, token
    auth off, ports of its own; ``env`` reaches every node (and so every worker and job driver)."""

    def __init__(self, temp_root: Path, *, nodes: int = 2, cpus: int = 1, env: dict[str, str] | None = None,
                 object_store_mb: int = 300) -> None:
        self.nodes, self.cpus, self.object_store_mb = nodes, cpus, object_store_mb
        # short: Ray's unix sockets live under it (at most 107 bytes)
        self.temp = temp_root / f"c-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                    "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def _start(self, args: list[str], log: str) -> None:
        out = open(self.temp.parent / f"{self.temp.name}-{log}.log", "wb")  # noqa: SIM115 - lives with the node
        self.procs.append(subprocess.Popen([str(RAY), "start", "--block", "--node-ip-address=127.0.0.1",
                                            f"--num-cpus={self.cpus}",
                                            f"--object-store-memory={self.object_store_mb * 1024**2}",
                                            "--disable-usage-stats", *args], env=self.env,
                                           start_new_session=True, stdout=out, stderr=subprocess.STDOUT))
        out.close()

    def start(self, timeout: float = 240) -> RayCluster:
        self.temp.parent.mkdir(parents=True, exist_ok=True)
        self._start(["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dash_port}", f"--temp-dir={self.temp}", *_node_ports(True)], "head")
        deadline = time.time() + timeout
        while not self._gcs_up():
            self._check_alive()
            if time.time() > deadline:
                raise TimeoutError(f"Ray head did not come up: {self.logs()}")
            time.sleep(1)
        for i in range(1, self.nodes):
            self._start([f"--address={self.address}", *_node_ports(False)], f"worker{i}")
        while len(self.alive_nodes()) < self.nodes:
            self._check_alive()
            if time.time() > deadline:
                raise TimeoutError(f"{len(self.alive_nodes())} of {self.nodes} Ray nodes up: {self.logs()}")
            time.sleep(2)
        return self

    def _gcs_up(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.gcs_port)) == 0

    def _check_alive(self) -> None:
        dead = [p.args for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a Ray node exited: {dead}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.temp.parent.glob(f"{self.temp.name}-*.log")))

    def ask(self, expr: str) -> Any:
        """``expr`` evaluated by a driver of its own connected to the cluster (None if it cannot connect):
        this process may hold another cluster."""
        code = (f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
                f"print(json.dumps({expr}))")
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode:
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict]:
        return self.ask("[{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
                        "for n in ray.nodes() if n['Alive']]") or []

    def wait_idle(self, timeout: float = 120) -> None:
        """Until every CPU of the cluster is free again (a killed driver's tasks and actors are ended)."""
        deadline = time.time() + timeout
        while True:
            cpus = self.ask("[ray.cluster_resources().get('CPU', 0), ray.available_resources().get('CPU', 0)]")
            if cpus and cpus[1] >= cpus[0]:
                return
            if time.time() > deadline:
                raise TimeoutError(f"cluster still busy after {timeout}s: CPUs (total, free) {cpus}")
            time.sleep(1)

    def submit(self, entry: list[str], *, working_dir: Path, runtime_env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir ... -- entry`` through the dashboard; retried while the job agent
        is still coming up. Raises with the job's output when it fails."""
        args = [str(RAY), "job", "submit", f"--address={self.dashboard}", f"--working-dir={working_dir}"]
        if runtime_env:
            args.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        deadline = time.time() + timeout
        while True:
            job = subprocess.run([*args, "--", *entry], env=self.env, capture_output=True, text=True,
                                 timeout=timeout, cwd=working_dir)
            submitted = "submitted successfully" in job.stdout + job.stderr
            if job.returncode == 0 or submitted or time.time() > deadline:
                break
            time.sleep(3)
        if job.returncode != 0:
            raise AssertionError(f"job {entry} failed (rc {job.returncode}):\n{job.stdout[-6000:]}\n"
                                 f"{job.stderr[-3000:]}")
        return job

    def tasks_by_node(self) -> dict[str, dict[str, int]]:
        """node id -> task name -> how many tasks (and actor tasks) of that name ran there (Ray's state API)."""
        proc = subprocess.run([str(RAY), "list", "tasks", f"--address={self.dashboard}", "--format=json",
                               "--detail", "--limit=10000"],
                              env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        nodes: dict[str, dict[str, int]] = {}
        for t in json.loads(proc.stdout):
            if t.get("node_id"):
                names = nodes.setdefault(t["node_id"], {})
                names[t.get("name") or "?"] = names.get(t.get("name") or "?", 0) + 1
        return nodes

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to every node's process group, SIGKILL to whatever is left after ``grace`` seconds."""
        for p in reversed(self.procs):  # workers first, then the head
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.time()))
            # the node's raylet, GCS, agents and workers share its process group: leave none behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def __enter__(self) -> RayCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def job_result(stdout: str) -> dict[str, Any]:
    """The JSON line the job entry (pipelines/recaption.py) prints last."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{") and '"balanced"' in ln]
    assert lines, stdout[-4000:]
    return json.loads(lines[-1])

"""Airflow DAG ``vila2_curate``: ingest -> curate -> recaption -> specialists -> deltaloss -> publish.

Every task calls the same entry points a user runs by hand: the CLI (``mode: cli``) or the Ray job entry
(``mode: ray_job``: ``ray job submit ... -- python pipelines/recaption.py --config C --round K``). Rounds are
DAG runs with a ``round`` param (``{{ params.round }}``); with ``rounds: N`` in the DAG config, round k's
publish triggers the run for round k+1 until N, so one trigger (or one scheduled run) walks all rounds.

Retries are safe because every command is idempotent: a run resumes per input shard (a finished shard's
marker is written last, atomically), global decisions are reused when their segment hash matches, and the
dataset files are rebuilt from the markers. Rerunning a task's command after a crash therefore only
redoes unfinished shards and yields byte-identical output. In ray_job mode a retry first stops the job its
earlier try submitted (it may outlive a killed Airflow worker), so two jobs never write the same output.

Configuration: a YAML file named by ``VILA2_DAG_CONFIG`` (keys in ``DagConfig``; relative paths resolve
against the repository root, which is also the tasks' working directory). The folder a round publishes is
not a DAG setting: it is the ``output.path`` of the round's last config (``deltaloss_config``, else
``specialists_config``, else ``recaption_config``) for that round, read when ``publish`` runs, so the DAG
always validates the dataset its commands wrote. A failed validation fails ``publish`` at once (no
retries: the same files give the same verdict) with the validator's findings and the config named. Airflow loads this module from
a dags folder holding a one-line loader (``from vila2_curate.pipelines.airflow_dag import dag``) in an
environment where the project is installed (``pip install -e .`` in the checkout); every import is absolute
under ``vila2_curate``, so nothing here touches sys.path.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

ROOT = Path(__file__).resolve().parents[1]  # the repository checkout: relative config paths and the tasks' cwd

DAG_ID = "vila2_curate"
CONFIG_ENV = "VILA2_DAG_CONFIG"
SUCCESS = "_SUCCESS"
ROUND = "{{ params.round }}"


@dataclass(frozen=True)
class DagConfig:
    """The DAG's settings; every field can be set in the YAML named by ``VILA2_DAG_CONFIG``."""

    schedule: str | None = "@weekly"  # cron or preset; null: triggered runs only
    curation_config: str = "configs/quickstart.yaml"
    recaption_config: str = "configs/recaption.yaml"  # its stages may include the specialists (default)
    specialists_config: str | None = None  # a config with only specialist stages; None: they ran above
    deltaloss_config: str | None = None  # post-recaption DeltaLoss; None: DeltaLoss ran in curation
    rounds: int = 2  # recaption rounds; round k's publish triggers round k+1 while k < rounds
    mode: str = "cli"  # "cli" | "ray_job"
    ray_address: str = "http://127.0.0.1:8265"  # the Ray dashboard (job submission) address
    working_dir: str = "."  # ray_job: uploaded as the job's working dir; cli: the commands' cwd
    cli: str = "vila2-curate"  # the CLI executable on the Airflow workers
    ingest_command: str | None = None  # e.g. an img2dataset download; run before the input check
    retries: int = 2
    retry_delay_minutes: float = 5.0
    start_date: str = "2025-01-01"

    @classmethod
    def load(cls, path: str | None = None) -> DagConfig:
        path = path or os.environ.get(CONFIG_ENV)
        if not path:
            return cls()
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if "out_dir" in raw:
            raise ValueError(f"{path}: out_dir is no longer a DAG setting: publish validates the output.path "
                             "of the round's last config (deltaloss_config, else specialists_config, else "
                             "recaption_config); remove out_dir and set the folder there")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown DAG config keys {sorted(unknown)}")
        cfg = cls(**raw)
        if cfg.mode not in ("cli", "ray_job"):
            raise ValueError(f"{path}: mode must be 'cli' or 'ray_job', got {cfg.mode!r}")
        if cfg.rounds < 1:
            raise ValueError(f"{path}: rounds must be >= 1")
        return cfg

    def path(self, p: str) -> str:
        """Relative local paths resolve against the repository root (URLs and absolute paths unchanged)."""
        return p if "://" in p or p.startswith("/") else str((ROOT / p).resolve())

    def published_config(self) -> str:
        """The config whose output a round publishes: the last command of the round that writes a dataset."""
        return self.deltaloss_config or self.specialists_config or self.recaption_config

    def round_output(self, round_: int) -> str:
        """The folder round ``round_`` publishes: the published config's ``output.path`` for that round."""
        from vila2_curate.schemas.config import load_config

        return load_config(self.path(self.published_config()), round=round_).output.path


def _ray_id(value: str) -> str:
    """Ray submission ids allow letters, digits, '-' and '_' only; Airflow run ids hold ':' and '+'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)


def stage_command(cfg: DagConfig, config: str, task_id: str, with_round: bool) -> str:
    """The templated shell command of one stage task (rendered by Airflow per DAG run)."""
    round_args = f" --round {ROUND}" if with_round else ""
    if cfg.mode == "cli":
        return f"{shlex.quote(cfg.cli)} run {shlex.quote(cfg.path(config))}{round_args} --no-progress"
    addr = shlex.quote(cfg.ray_address)
    # Paths stay as written: the job runs inside the uploaded working dir, where they resolve the same way.
    sid = f"vila2_{task_id}_{{{{ run_id | ray_id }}}}_try"
    stop_earlier = (f"{{% for t in range(1, ti.try_number) %}}ray job stop --address {addr} {sid}{{{{ t }}}}"
                    f" >/dev/null 2>&1 || true; {{% endfor %}}")
    submit = (f"ray job submit --address {addr} --submission-id {sid}{{{{ ti.try_number }}}} "
              f"--working-dir {shlex.quote(cfg.path(cfg.working_dir))} -- "
              f"python pipelines/recaption.py --config {shlex.quote(config)}{round_args} --no-progress")
    # `ray job submit` exits 0 for a job someone stopped; only SUCCEEDED counts as done.
    check = (f"ray job status --address {addr} {sid}{{{{ ti.try_number }}}} | grep -q SUCCEEDED")
    return f"{stop_earlier}{submit} && {check}"


def ingest_command(cfg: DagConfig) -> str:
    """List the curation config's input shards and fail when there are none (after an optional download)."""
    check = f"{shlex.quote(cfg.cli)} inputs {shlex.quote(cfg.path(cfg.curation_config))}"
    return f"{cfg.ingest_command} && {check}" if cfg.ingest_command else check


class PublishValidationError(RuntimeError):
    """The round's dataset did not validate; the message holds the validator's findings."""


def publish(out_dir: str, round_: int, run_id: str, cli: str = "vila2-curate", origin: str | None = None) -> str:
    """Validate the round's dataset with the CLI; only if it passes, write ``_SUCCESS`` atomically.

    ``origin`` names where ``out_dir`` came from (the config and round), for the error message.

    A failed validation also removes a stale ``_SUCCESS`` (from an earlier run of the same round), so the
    marker never vouches for output that no longer validates. Returns the marker's path.
    """
    import fsspec

    from vila2_curate.pipelines.io.writers.atomic import join, write_json_atomic

    out_dir = out_dir.replace("{round}", str(round_))
    fs, root = fsspec.core.url_to_fs(out_dir)
    marker = join(root, SUCCESS)
    proc = subprocess.run([*shlex.split(cli), "validate", out_dir], capture_output=True, text=True)
    if proc.returncode != 0:
        if fs.exists(marker):
            fs.rm(marker)
        where = f" ({origin})" if origin else ""
        raise PublishValidationError(f"validation of {out_dir}{where} failed (exit {proc.returncode}):\n"
                                     f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    write_json_atomic(fs, marker, {"round": round_, "dag_id": DAG_ID, "run_id": run_id,
                                   "validated": proc.stdout.strip().splitlines()[-1:]})
    return marker


def build_dag(cfg: DagConfig | None = None) -> DAG:
    cfg = cfg or DagConfig.load()
    with DAG(
        dag_id=DAG_ID,
        schedule=cfg.schedule,
        start_date=dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,  # rounds build on each other's output
        params={"round": Param(1, type="integer", minimum=1, maximum=cfg.rounds,
                               description="recaption round K: reads round K-1's dataset, writes round K's")},
        default_args={"retries": cfg.retries, "retry_delay": dt.timedelta(minutes=cfg.retry_delay_minutes)},
        user_defined_filters={"ray_id": _ray_id},
        tags=["vila2", "curation"],
        doc_md=__doc__,
    ) as dag:
        cwd = cfg.path(cfg.working_dir)
        env = {"PYTHONPATH": str(ROOT)}

        def bash(task_id: str, command: str) -> BashOperator:
            return BashOperator(task_id=task_id, bash_command=command, cwd=cwd, env=env, append_env=True)

        ingest = bash("ingest", ingest_command(cfg))
        curate = bash("curate", stage_command(cfg, cfg.curation_config, "curate", with_round=False))
        recaption = bash("recaption", stage_command(cfg, cfg.recaption_config, "recaption", with_round=True))
        # The specialists run in the recaption round's config by default (one pass over the images, the
        # models co-located on a GPU); a separate specialists_config makes them their own command.
        specialists = bash("specialists", stage_command(cfg, cfg.specialists_config, "specialists", True)
                           if cfg.specialists_config else
                           f"echo 'specialists ran in {cfg.recaption_config} (round {ROUND})'")
        deltaloss = bash("deltaloss", stage_command(cfg, cfg.deltaloss_config, "deltaloss", True)
                         if cfg.deltaloss_config else
                         f"echo 'DeltaLoss ran in {cfg.curation_config}'")

        @task(task_id="publish")
        def publish_task(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
            k = int((params or {})["round"])
            origin = f"output.path of {cfg.published_config()} for round {k}"
            try:
                return publish(cfg.round_output(k), k, run_id or "", cfg.cli, origin)
            except PublishValidationError as e:
                raise AirflowFailException(str(e)) from None  # a retry would validate the same files

        @task(task_id="next_round")
        def next_round(params: dict[str, Any] | None = None) -> dict[str, int]:
            k = int((params or {})["round"])
            if k >= cfg.rounds:
                raise AirflowSkipException(f"round {k} is the last of {cfg.rounds}")
            return {"round": k + 1}

        conf = next_round()
        trigger = TriggerDagRunOperator(task_id="trigger_next_round", trigger_dag_id=DAG_ID, conf=conf,
                                        wait_for_completion=False, retries=0)
        ingest >> curate >> recaption >> specialists >> deltaloss >> publish_task() >> conf >> trigger
    return dag


dag = build_dag()

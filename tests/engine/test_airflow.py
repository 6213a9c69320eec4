"""The Airflow DAG loads offline through a DagBag and renders the commands a user would type.

Importing Airflow costs ~10 s, so the module loads one DagBag and every test reads from it.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT, tiny_valid_output

pytest.importorskip("airflow")

DAG_CONFIG = """\
schedule: "0 3 * * 1"
curation_config: configs/quickstart.yaml
recaption_config: configs/recaption.yaml
deltaloss_config: configs/deltaloss.yaml
rounds: 3
mode: cli
retries: 3
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):
    from airflow.dag_processing.dagbag import DagBag

    tmp = tmp_path_factory.mktemp("airflow")
    (tmp / "dag.yaml").write_text(DAG_CONFIG)
    dags = tmp / "dags"
    dags.mkdir()
    # What a deployment puts in its dags folder: a loader; the DAG itself lives in the repository.
    (dags / "vila2_curate_dag.py").write_text(
        "from vila2_curate.pipelines.airflow_dag import dag  # noqa: F401\n")
    old = os.environ.get("VILA2_DAG_CONFIG")
    os.environ["VILA2_DAG_CONFIG"] = str(tmp / "dag.yaml")
    try:
        try:
            bag = DagBag(dag_folder=str(dags), include_examples=False)
        except TypeError:  # Airflow 3.3 dropped include_examples (examples are no longer in the bag)
            bag = DagBag(dag_folder=str(dags))
        yield bag
    finally:
        if old is None:
            os.environ.pop("VILA2_DAG_CONFIG", None)
        else:
            os.environ["VILA2_DAG_CONFIG"] = old


def _render(dag, task_id: str, round_: int, try_number: int = 1) -> str:
    task = dag.get_task(task_id)
    ctx = {"params": {"round": round_}, "run_id": "manual__2025-01-06T03:00:00+00:00",
           "ti": types.SimpleNamespace(try_number=try_number)}
    return task.render_template(task.bash_command, ctx, jinja_env=dag.get_template_env())


def test_dag_loads_without_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert list(dagbag.dag_ids) == ["vila2_curate"]


def test_task_order(dagbag):
    dag = dagbag.dags["vila2_curate"]
    chain = ["ingest", "curate", "recaption", "specialists", "deltaloss", "publish", "next_round",
             "trigger_next_round"]
    assert set(dag.task_ids) == set(chain)
    for up, down in zip(chain, chain[1:], strict=False):
        assert dag.get_task(up).downstream_task_ids == {down}, up
        assert dag.get_task(down).upstream_task_ids == {up}, down
    assert dag.get_task("ingest").upstream_task_ids == set()


def test_schedule_params_and_retries(dagbag):
    dag = dagbag.dags["vila2_curate"]
    assert dag.schedule == "0 3 * * 1" and dag.timetable.expression == "0 3 * * 1"
    assert dag.params["round"] == 1
    spec = dag.params.get_param("round").schema
    assert spec["type"] == "integer" and spec["minimum"] == 1 and spec["maximum"] == 3
    assert dag.max_active_runs == 1
    for tid in ("ingest", "curate", "recaption", "specialists", "deltaloss", "publish"):
        assert dag.get_task(tid).retries == 3, tid


def test_rendered_cli_commands_for_round_2(dagbag):
    dag = dagbag.dags["vila2_curate"]
    assert _render(dag, "recaption", 2) == f"vila2-curate run {ROOT}/configs/recaption.yaml --round 2 --no-progress"
    assert _render(dag, "curate", 2) == f"vila2-curate run {ROOT}/configs/quickstart.yaml --no-progress"
    assert _render(dag, "deltaloss", 2) == f"vila2-curate run {ROOT}/configs/deltaloss.yaml --round 2 --no-progress"
    assert "recaption.yaml (round 2)" in _render(dag, "specialists", 2)  # specialists ran in the round config
    assert " inputs " in _render(dag, "ingest", 2)
    assert dag.get_task("recaption").cwd == str(ROOT)


def test_ray_job_mode_renders_job_submit(dagbag):
    from vila2_curate.pipelines.airflow_dag import DagConfig, build_dag

    dag = build_dag(DagConfig(mode="ray_job", ray_address="http://head:8265"))
    first = _render(dag, "recaption", 2)
    sid = "vila2_recaption_manual__2025-01-06T03_00_00_00_00_try"
    assert first == (f"ray job submit --address http://head:8265 --submission-id {sid}1 --working-dir {ROOT} "
                     "-- python pipelines/recaption.py --config configs/recaption.yaml --round 2 --no-progress"
                     f" && ray job status --address http://head:8265 {sid}1 | grep -q SUCCEEDED")
    retry = _render(dag, "recaption", 2, try_number=3)  # a retry stops the jobs its earlier tries started
    assert retry.startswith(f"ray job stop --address http://head:8265 {sid}1 >/dev/null 2>&1 || true; "
                            f"ray job stop --address http://head:8265 {sid}2 ")
    assert f"--submission-id {sid}3 " in retry
    assert "--round" not in _render(dag, "curate", 2)


def test_ingest_check_runs(dagbag, tmp_path: Path):
    """The rendered ingest command really runs (it lists the quickstart's inputs: none on a bare tree)."""
    import subprocess

    cmd = _render(dagbag.dags["vila2_curate"], "ingest", 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the venv's python
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == (0 if out["input_shards"] else 1)


def test_publish_writes_success_only_when_valid(dagbag, tmp_path: Path):
    from vila2_curate.pipelines.airflow_dag import publish

    out = tmp_path / "r2"
    tiny_valid_output(tmp_path, out)
    cli = f"{sys.executable} -m vila2_curate.pipelines.cli"
    (out / "_SUCCESS").write_text("stale")
    (out / "c" / "bogus.tar").write_bytes(b"not a tar")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with pytest.raises(RuntimeError, match="validation of"):
            publish(str(tmp_path / "r{round}"), 2, "run-1", cli)
        assert not (out / "_SUCCESS").exists()  # a stale marker must not vouch for invalid output
        (out / "c" / "bogus.tar").unlink()
        marker = publish(str(tmp_path / "r{round}"), 2, "run-1", cli)
    finally:
        os.chdir(cwd)
    assert json.loads(Path(marker).read_text())["round"] == 2
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_round_output_comes_from_the_round_config_and_out_dir_is_refused(dagbag, tmp_path: Path):
    from vila2_curate.pipelines.airflow_dag import DagConfig

    # One source of truth: the folder publish validates is the recaption config's output.path for round k.
    assert DagConfig().round_output(2) == str(ROOT / "out" / "quickstart" / "r2")
    assert DagConfig(deltaloss_config="configs/x.yaml").published_config() == "configs/x.yaml"
    stale = tmp_path / "dag.yaml"
    stale.write_text("out_dir: out/elsewhere/r{round}\n")
    with pytest.raises(ValueError, match="out_dir is no longer a DAG setting"):
        DagConfig.load(str(stale))

"""A plan the Ray cluster cannot place ends in one error line (exit 2) or a bounded, visible wait, never a
silent hang (pipelines/executors/ray_placement.py)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import yaml

from vila2_curate.pipelines.cli import describe_error
from vila2_curate.pipelines.engine.plan import Plan, Segment
from vila2_curate.pipelines.executors.ray_placement import (
    GIB,
    PlacementError,
    check_placement,
    packs,
    placement_problem,
    segment_operators,
)
from vila2_curate.schemas.stage import Resources, StageBase


class _Stage(StageBase):
    def __init__(self, name: str, cpus: float = 1.0, gpus: float = 0.0, memory_gb: float = 0.0,
                 workers: int = 1, model: bool = False) -> None:
        self.name, self.default_resources, self.loads_model = name, Resources(cpus, gpus, memory_gb), model
        self._workers = workers

    @property
    def workers(self) -> int:
        return self._workers


def _ops(*stages: _Stage):
    return segment_operators(Segment(0, list(stages)))


def _cpu_nodes(n: int, cpus: float, memory_gb: float = 8.0) -> list[dict[str, float]]:
    return [{"CPU": cpus, "memory": memory_gb * GIB, "object_store_memory": 1e9}] * n


def test_a_gpu_stage_on_a_cpu_only_cluster_names_the_stage_its_ask_and_the_cluster():
    problem = placement_problem(_ops(_Stage("normalize"), _Stage("vlm", gpus=1, model=True)), _cpu_nodes(2, 2))
    assert problem is not None
    assert problem.startswith("stage 'vlm' asks 1 CPU + 1 GPU per worker and no node")
    assert "2 nodes of 2 CPU, 0 GPU, 8.0 GiB memory" in problem
    assert "\n" not in problem


def test_ocr_and_grounding_pools_on_two_nodes_of_two_cpus():
    nodes = _cpu_nodes(2, 2)
    # reader + ocr + grounding + the recaption pool: 4 workers of 1 CPU on 4 CPUs
    fits = _ops(_Stage("recaption", model=True), _Stage("ocr", model=True), _Stage("grounding", model=True))
    assert placement_problem(fits, nodes) is None
    # one more worker than CPUs: the stage that no longer fits is named, with what is already placed
    over = _ops(_Stage("recaption", model=True), _Stage("ocr", model=True), _Stage("grounding", model=True),
                _Stage("spatial"))
    problem = placement_problem(over, nodes)
    assert problem is not None and problem.startswith("stage 'spatial' asks 1 x 1 CPU and cannot be placed beside")
    assert "stage 'grounding': 1 worker of 1 CPU" in problem and "5 CPU in all" in problem
    assert "2 nodes of 2 CPU" in problem
    # pools of several workers count every actor
    problem = placement_problem(_ops(_Stage("ocr", workers=2, model=True), _Stage("grounding", workers=2, model=True)),
                                nodes)
    assert problem is not None and problem.startswith("stage 'grounding' asks 2 x 1 CPU")
    # bin packing, not a sum: 1 + 1.5 + 1.5 = 4 CPUs, but two 1.5-CPU workers never share a 2-CPU node
    split = _ops(_Stage("ocr", cpus=1.5, model=True), _Stage("grounding", cpus=1.5, model=True))
    assert not packs(split, nodes)
    assert packs(split, _cpu_nodes(1, 4))


def test_a_segment_without_models_is_one_shard_task():
    """Model-free segments run as one 1-CPU task per shard, whatever CPU their stages declare."""
    ops = _ops(_Stage("normalize"), _Stage("caption_hygiene", cpus=4))
    assert [(o.name, o.cpus, o.count) for o in ops] == [
        ("the shard task (reader + 'normalize' + 'caption_hygiene')", 1.0, 1)]
    assert placement_problem(ops, _cpu_nodes(1, 1)) is None


def test_task_stages_with_the_same_ask_count_once():
    """Ray Data fuses consecutive tasks with equal remote args, the reader's too, into one operator."""
    # the reader's task is counted on its own before a model stage's actors
    assert [o.name for o in _ops(_Stage("normalize"), _Stage("clip", model=True))] == [
        "the reader + 'normalize'", "stage 'clip'"]
    assert len(_ops(_Stage("normalize"), _Stage("clip", gpus=0.5, model=True))) == 2


def test_memory_is_packed_per_node():
    stage = _Stage("vlm", memory_gb=3, workers=2, model=True)
    problem = placement_problem(_ops(stage), _cpu_nodes(1, 8, memory_gb=4))
    assert problem is not None and "stage 'vlm' asks 2 x 1 CPU + 3.0 GiB memory" in problem
    assert placement_problem(_ops(stage), _cpu_nodes(2, 8, memory_gb=4)) is None
    too_big = placement_problem(_ops(_Stage("vlm", memory_gb=16, model=True)), _cpu_nodes(4, 8, memory_gb=4))
    assert too_big is not None and too_big.startswith("stage 'vlm' asks 1 CPU + 16.0 GiB memory per worker")


def test_fractional_gpus_share_one_gpu_but_never_span_two():
    one_gpu = [{"CPU": 8, "GPU": 1, "memory": 32 * GIB}]
    specialists = _ops(_Stage("ocr", gpus=0.25, model=True), _Stage("grounding", gpus=0.25, model=True),
                       _Stage("spatial", gpus=0.5, model=True))
    assert placement_problem(specialists, one_gpu) is None
    crowded = _ops(_Stage("ocr", gpus=0.6, model=True), _Stage("grounding", gpus=0.6, model=True))
    problem = placement_problem(crowded, one_gpu)
    assert problem is not None and problem.startswith("stage 'grounding' asks 1 x 1 CPU + 0.6 GPU")
    # three 0.6 shares on two GPUs: 1.8 <= 2 in sum, yet a share must fit in one GPU
    two_gpus = [{"CPU": 8, "GPU": 2, "memory": 32 * GIB}]
    assert not packs(_ops(_Stage("a", gpus=0.6, workers=3, model=True)), two_gpus)
    assert packs(_ops(_Stage("a", gpus=0.5, workers=4, model=True)), two_gpus)
    assert packs(_ops(_Stage("a", gpus=1, workers=2, model=True)), two_gpus)


def _gpu_plan() -> Plan:
    return Plan([Segment(0, [_Stage("normalize")]), Segment(1, [_Stage("vlm", gpus=1, model=True)])], "h", {})


def test_fails_at_once_without_a_timeout_and_as_a_config_error():
    with pytest.raises(PlacementError) as err:
        check_placement(_gpu_plan(), 0, nodes=lambda: _cpu_nodes(1, 4), sleep=pytest.fail)
    code, message = describe_error(err.value)
    assert code == 2 and message.startswith("stage 'vlm' asks 1 CPU + 1 GPU") and "\n" not in message
    assert "ray.placement_timeout_s" in message


def test_waits_for_an_autoscaler_visibly_then_runs_or_fails():
    now = [0.0]
    clusters = iter([_cpu_nodes(1, 4)] * 3 + [[*_cpu_nodes(1, 4), {"CPU": 8, "GPU": 1, "memory": 64 * GIB}]])
    out = io.StringIO()

    def sleep(s: float) -> None:
        now[0] += s

    check_placement(_gpu_plan(), 60, nodes=lambda: next(clusters), poll_s=5, out=out, clock=lambda: now[0],
                    sleep=sleep)
    lines = out.getvalue().splitlines()
    assert now[0] == 15 and len(lines) == 1  # one line while what is missing stays the same
    assert lines[0].startswith("waiting for the cluster to grow (60 s left of ray.placement_timeout_s=60): "
                               "stage 'vlm' asks 1 CPU + 1 GPU per worker")
    now[0], out = 0.0, io.StringIO()
    with pytest.raises(PlacementError, match=r"after waiting 20 s for the cluster to grow"):
        check_placement(_gpu_plan(), 20, nodes=lambda: _cpu_nodes(1, 4), poll_s=5, out=out,
                        clock=lambda: now[0], sleep=sleep)
    assert now[0] == 20 and len(out.getvalue().splitlines()) == 1


def test_cli_ends_a_gpu_stage_on_a_cpu_only_cluster_with_one_error_line(ray_cluster, tmp_path: Path, capsys):
    """Through ``vila2-curate run --engine ray`` on the session's CPU-only cluster: no hang, exit 2."""
    from vila2_curate.pipelines.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "placement", "engine": "ray",
        "sources": [{"name": "web", "kind": "coyo_parquet", "paths": [str(tmp_path / "in" / "*.parquet")],
                     "image_column": "image"}],
        "stages": [{"type": "normalize"},
                   {"type": "clipscore", "model": str(tmp_path / "clip"), "runtime": {"gpus": 1}}],
        "output": {"path": str(tmp_path / "out")},
    }, sort_keys=False))
    capsys.readouterr()
    start = time.monotonic()
    code = main(["run", str(config), "--no-progress"])
    elapsed = time.monotonic() - start
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: stage 'clipscore' asks 1 CPU + 1 GPU per worker"), err
    assert "0 GPU" in err[0]
    assert elapsed < 30
    assert not (tmp_path / "out").exists()  # nothing was started

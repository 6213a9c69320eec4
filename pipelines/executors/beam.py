"""Beam engine: the CPU curation stages as Beam pipelines (FnApiRunner by default; Dataflow, Flink or
Spark through ``beam.runner`` / ``beam.pipeline_args``). Not run on Ray.

Per plan segment one pipeline: Create(pending shards) -> read (DoFn whose ``setup`` indexes the previous
decisions) -> each map stage (model stages through RunInference with a ModelHandler wrapping the stage,
so Beam manages model loading and sharing; others as a ParDo) -> part files -> GroupByKey(shard) ->
assembly into the same outputs the local engine writes. Global decisions: a second pipeline reads the
signatures, GroupByKey on the stage's ``group_by`` and calls ``decide`` per group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curation.decisions import index_decisions
from pipelines.aggregate import normalize_decisions
from pipelines.executors.local import plan_summaries, prepare_run, run_info, write_segment_summary
from pipelines.executors.parts import (
    WorkItem,
    assemble_shard,
    clear_parts,
    tagged_batches,
    uses_model,
    write_parts,
)
from pipelines.guard import apply_guarded
from pipelines.plan import Plan
from pipelines.progress import (
    finalize,
    is_done,
    load_marker,
    remove_stale_outputs,
    write_marker,
)
from pipelines.shard_task import merge_timings
from pipelines.workdir import read_decisions, read_done, read_signatures, write_decisions
from schemas.config import RunConfig

log = logging.getLogger(__name__)


def _beam():
    try:
        import apache_beam as beam
    except ImportError as e:  # datatrove-style: name the extra to install
        raise ImportError("the Beam engine needs apache-beam: pip install 'vila2-curate[beam]'") from e
    return beam


def _options(config: RunConfig):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(config.beam.pipeline_args, runner=config.beam.runner)


def _model_handler_class():
    from apache_beam.ml.inference.base import ModelHandler

    class StageModelHandler(ModelHandler):
        """RunInference adapter: the model is the stage itself, loaded by ``setup()`` once per worker."""

        def __init__(self, stage: Any) -> None:
            super().__init__()
            self.stage = stage

        def load_model(self) -> Any:
            self.stage.setup()
            return self.stage

        def run_inference(self, batch: Sequence[pa.Table], model: Any,
                          inference_args: dict[str, Any] | None = None) -> Iterable[pa.Table]:
            return [apply_guarded(model, table) for table in batch]

        def batch_elements_kwargs(self) -> dict[str, Any]:
            return {"min_batch_size": 1, "max_batch_size": 1}  # elements are already Arrow batches

        def get_num_bytes(self, batch: Sequence[pa.Table]) -> int:
            return sum(t.nbytes for t in batch)

    return StageModelHandler


def run_beam(config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    beam = _beam()
    fs, root, plan, work = prepare_run(config)
    items = [WorkItem(i, reader, shard) for i, (reader, shard) in enumerate(work)]
    for segment in plan.segments:
        last = segment.decide is None
        seg_hash = plan.segment_hash(segment.index)
        if not last and read_decisions(fs, root, segment.index, seg_hash) is not None:
            continue
        prev = None
        if segment.index:
            prev = read_decisions(fs, root, segment.index - 1, plan.segment_hash(segment.index - 1))
            if prev is None:
                raise RuntimeError(f"decisions of segment {segment.index - 1} are missing")
        if last:
            pending = [it for it in items if not is_done(fs, root, it.shard, plan.plan_hash)]
            for it in pending:
                remove_stale_outputs(fs, root, it.shard)
        else:
            pending = [it for it in items
                       if (read_done(fs, root, segment.index, it.shard) or {}).get("segment_hash") != seg_hash]
        if pending:
            _map_pipeline(beam, config, fs, root, plan, segment.index, items, pending, prev)
        if not last:
            _decide_pipeline(beam, config, fs, root, plan, segment, items)
    results = [load_marker(fs, root, it.shard) for it in items]
    return finalize(fs, root, config.name, results, plan_summaries(fs, root, plan), run_info(plan, config))


def _map_pipeline(beam, config: RunConfig, fs, root: str, plan: Plan, seg: int, items: list[WorkItem],
                  pending: list[WorkItem], prev: pa.Table | None) -> None:
    from apache_beam.ml.inference.base import RunInference

    segment = plan.segments[seg]
    prev_stage = plan.segments[seg - 1].decide.name if seg else None
    shards = [it.shard for it in items]
    handler_cls = _model_handler_class()
    for it in pending:
        clear_parts(fs, root, seg, it.shard)

    class ReadShard(beam.DoFn):
        def setup(self) -> None:
            self.prev = index_decisions(prev) if prev is not None else None

        def process(self, index: int):
            yield from tagged_batches(fs, root, items[index], seg, config.batch_size, self.prev, prev_stage)

    class RunStage(beam.DoFn):
        def __init__(self, stage: Any) -> None:
            self.stage = stage

        def setup(self) -> None:
            self.stage.setup()

        def process(self, batch: pa.Table):
            yield apply_guarded(self.stage, batch)

    class WriteParts(beam.DoFn):
        def process(self, batch: pa.Table):
            for part in write_parts(fs, root, seg, batch, shards):
                yield part["shard_index"], part

    class Assemble(beam.DoFn):
        def process(self, element):
            index, parts = element
            item = items[index]
            result = assemble_shard(fs, root, plan, seg, item, list(parts), config.output, config.batch_size)
            if result is not None:
                earlier = [(read_done(fs, root, s.index, item.shard) or {}).get("timings")
                           for s in plan.segments[:-1]]
                result.timings = merge_timings([*earlier, result.timings])
                result.plan_hash = plan.plan_hash
                write_marker(fs, root, result)
            yield index

    with beam.Pipeline(options=_options(config)) as p:
        for kind in sorted({it.shard.row_kind for it in pending}):  # one row schema per PCollection
            subset = [it.index for it in pending if it.shard.row_kind == kind]
            batches = p | f"shards_{kind}" >> beam.Create(subset) | f"read_{kind}" >> beam.ParDo(ReadShard())
            for stage in segment.maps:
                label = f"{stage.name}_{kind}"
                if uses_model(stage):
                    batches = batches | label >> RunInference(handler_cls(stage))
                else:
                    batches = batches | label >> beam.ParDo(RunStage(stage))
            (batches
             | f"parts_{kind}" >> beam.ParDo(WriteParts())
             | f"group_{kind}" >> beam.GroupByKey()
             | f"assemble_{kind}" >> beam.ParDo(Assemble()))
    # a shard with no rows at all has no parts, so GroupByKey never saw it: give it its (empty) outputs
    for it in pending:
        finished = (is_done(fs, root, it.shard, plan.plan_hash) if segment.decide is None else
                    (read_done(fs, root, seg, it.shard) or {}).get("segment_hash") == plan.segment_hash(seg))
        if not finished:
            Assemble().process((it.index, [])).__next__()


def _decide_pipeline(beam, config: RunConfig, fs, root: str, plan: Plan, segment, items: list[WorkItem]) -> None:
    stage = segment.decide
    seg_hash = plan.segment_hash(segment.index)
    signatures = read_signatures(fs, root, segment.index, [it.shard for it in items])

    def split_groups(table: pa.Table):
        if stage.group_by is None:
            yield None, table
            return
        keys = table.column(stage.group_by)
        for value in pc.unique(keys).to_pylist():
            mask = pc.is_null(keys) if value is None else pc.equal(keys, pa.scalar(value, keys.type))
            yield value, table.filter(mask)

    def decide(element):
        _, tables = element
        return normalize_decisions(stage.decide(pa.concat_tables(list(tables))))

    def write(tables: list[pa.Table]) -> None:
        decisions = pa.concat_tables(tables) if tables else normalize_decisions(None)
        write_segment_summary(fs, root, segment, normalize_decisions(decisions), signatures)
        write_decisions(fs, root, segment.index, decisions, seg_hash)

    chunks = [signatures.slice(i, 4096) for i in range(0, signatures.num_rows, 4096)]
    with beam.Pipeline(options=_options(config)) as p:
        (p | "signatures" >> beam.Create(chunks)
         | "by_group" >> beam.FlatMap(split_groups)
         | "group" >> beam.GroupByKey()
         | "decide" >> beam.Map(decide)
         | "collect" >> beam.combiners.ToList()
         | "write" >> beam.Map(write))

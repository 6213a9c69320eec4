"""Beam engine: the curation stages as Beam pipelines (FnApiRunner by default; Dataflow, Flink or Spark
through ``beam.runner`` / ``beam.pipeline_args``). Not run on Ray. The segment loop is the runner's; this
file supplies:

- map shards: a segment without model stages is Create(pending shards) -> one shard start to end per
  element, the local engine's path (``exchange.RunShard``: no exchange); one with model stages is
  Create(pending shards) -> read (each shard with its own decisions) -> each map stage (model stages
  through RunInference with a ModelHandler wrapping the stage, so Beam manages model loading and sharing;
  others as a ParDo) -> image-free part files -> GroupByKey(shard) -> assembly into the same outputs the
  local engine writes (``parts``);
- group and apply: Create(shards) -> load + split by key -> GroupByKey -> ``fn`` per group; the outputs
  come back to the driver through parquet files under ``_work`` (works on any runner);
- per shard: in the driver, one shard at a time (each call holds one shard's rows).
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa

from vila2_curate.pipelines.engine.aggregate import split_by_key
from vila2_curate.pipelines.engine.exchange import (
    RunShard,
    assemble_shard,
    clear_parts,
    clear_segment_parts,
    run_stage,
    runs_whole_shards,
    tagged_batches,
    uses_model,
    write_parts,
)
from vila2_curate.pipelines.engine.markers import segment_done
from vila2_curate.pipelines.engine.plan import Segment
from vila2_curate.pipelines.engine.runner import (
    DEFAULT_PARTITIONS,
    RunContext,
    WorkItem,
    run_engine,
)
from vila2_curate.pipelines.engine.shard_task import is_rereadable
from vila2_curate.pipelines.engine.workdir import WORK_DIR
from vila2_curate.pipelines.io.parquet_read import read_parquet
from vila2_curate.pipelines.io.writers.atomic import write_parquet_atomic
from vila2_curate.schemas.config import RunConfig

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
            return [run_stage(model, table) for table in batch]

        def batch_elements_kwargs(self) -> dict[str, Any]:
            return {"min_batch_size": 1, "max_batch_size": 1}  # elements are already Arrow batches

        def get_num_bytes(self, batch: Sequence[pa.Table]) -> int:
            return sum(t.nbytes for t in batch)

    return StageModelHandler


class BeamEngine:
    def __init__(self) -> None:
        self.beam = _beam()

    def map_shards(self, ctx: RunContext, segment: Segment, pending: list[WorkItem]) -> None:
        from apache_beam.ml.inference.base import RunInference

        beam, seg, fs, root, plan = self.beam, segment.index, ctx.fs, ctx.root, ctx.plan
        shards = [it.shard for it in ctx.items]
        items, config = ctx.items, ctx.config
        if runs_whole_shards(segment):
            run = RunShard(fs, root, plan, segment, config.output, config.batch_size)
            with beam.Pipeline(options=_options(config)) as p:
                (p | "shards" >> beam.Create([it.index for it in pending])
                 | "run" >> beam.Map(lambda index: run(items[index])))
            return
        handler_cls = _model_handler_class()
        for it in pending:
            clear_parts(fs, root, seg, it.shard)

        class ReadShard(beam.DoFn):
            def process(self, index: int):
                yield from tagged_batches(fs, root, plan, items[index], seg, config.batch_size)

        class RunStage(beam.DoFn):
            def __init__(self, stage: Any) -> None:
                self.stage = stage

            def setup(self) -> None:
                self.stage.setup()

            def process(self, batch: pa.Table):
                yield run_stage(self.stage, batch)

        rereadable = [is_rereadable(it.reader) for it in items]

        class WriteParts(beam.DoFn):
            def process(self, batch: pa.Table):
                for part in write_parts(fs, root, segment, batch, shards, rereadable):
                    yield part["shard_index"], part

        class Assemble(beam.DoFn):
            def process(self, element):
                index, parts = element
                assemble_shard(fs, root, plan, seg, items[index], list(parts), config.output, config.batch_size)
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
            if not segment_done(fs, root, plan, seg, it.shard):
                assemble_shard(fs, root, plan, seg, it, [], config.output, config.batch_size)
        clear_segment_parts(fs, root, seg)

    def group_apply(self, ctx: RunContext, items: list[WorkItem], load: Callable[[WorkItem], pa.Table | None],
                    key: str | None, fn: Callable[[pa.Table], pa.Table]) -> list[pa.Table]:
        beam, fs = self.beam, ctx.fs
        out_dir = posixpath.join(ctx.root, WORK_DIR, f"grouped-{uuid.uuid4().hex[:8]}")
        by_index = {it.index: it for it in items}

        def load_and_split(index: int):
            rows = load(by_index[index])
            if rows is not None and rows.num_rows:
                yield from split_by_key(rows, key)

        def apply(element) -> None:
            value, tables = element
            result = fn(pa.concat_tables(list(tables), promote_options="default"))
            if result is not None and result.num_rows:
                name = uuid.uuid4().hex  # a retried bundle may write twice; results are collected by group
                write_parquet_atomic(fs, posixpath.join(out_dir, f"{name}.parquet"),
                                     result.replace_schema_metadata({b"vila2.group": repr(value).encode()}))

        with beam.Pipeline(options=_options(ctx.config)) as p:
            (p | "shards" >> beam.Create(sorted(by_index))
             | "load" >> beam.FlatMap(load_and_split)
             | "group" >> beam.GroupByKey()
             | "apply" >> beam.Map(apply))
        results: dict[bytes, pa.Table] = {}
        if fs.exists(out_dir):
            for path in sorted(fs.find(out_dir)):
                t = read_parquet(fs, path)
                results.setdefault(t.schema.metadata[b"vila2.group"], t.replace_schema_metadata(None))
            fs.rm(out_dir, recursive=True)
        return [results[k] for k in sorted(results)]

    def decide_groups(self, ctx: RunContext) -> int:
        return DEFAULT_PARTITIONS

    def per_shard(self, ctx: RunContext, items: list[WorkItem], fn: Callable[[WorkItem], Any]) -> list[Any]:
        return [fn(it) for it in items]


def run_beam(config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    return run_engine(BeamEngine(), config)

"""MMC4 file layout against VILA's rank arithmetic: every rank of a 1-8 GPU job gets documents.

VILA's ``LazyMMC4Dataset.__init__`` (NVlabs/VILA, llava/data/dataset.py) is re-implemented here in
:func:`vila_rank_documents`, line for line, so the test checks our files against VILA's rule and not
against our own validator's copy of it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import fsspec
import pytest

from tests.helpers.rows import doc_row
from tests.helpers.runs import write_config
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter, first_part
from vila2_curate.pipelines.validate import check_output
from vila2_curate.schemas.config import load_config
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, make_table

FS = fsspec.filesystem("file")


def vila_rank_documents(data_path: str, world_size: int) -> tuple[list[int], list[list[str]]]:
    """``LazyMMC4Dataset.__init__`` for every rank: documents each rank gets, and its pkl files."""
    n_shards = len(os.listdir(data_path)) // 2
    count_info_list = sorted([f for f in os.listdir(data_path) if f.endswith(".count")])[:n_shards]
    n_samples = [int(Path(data_path, f).read_text().strip()) for f in count_info_list]  # open(...).read()
    shared_size = n_shards // world_size
    gpu_samples = [sum(n_samples[i * shared_size: (i + 1) * shared_size]) for i in range(world_size)]
    shard_names = [d.replace(".count", ".pkl") for d in count_info_list]
    files = [shard_names[r * shared_size: (r + 1) * shared_size] for r in range(world_size)]
    return gpu_samples, files


def _write(root: Path, n_docs: int, *, min_files: int, docs_per_pkl: int, batch: int = 3, stem: str = "00000"):
    w = Mmc4PklWriter(FS, str(root), f"mmc4/{stem}", docs_per_pkl=docs_per_pkl, min_files=min_files)
    table = make_table([doc_row(i, 1 + i % 3) for i in range(n_docs)], DOCUMENT_SCHEMA)
    for off in range(0, n_docs, batch):
        assert w.write(table.slice(off, batch)) == []
    return w.close()


def test_documents_are_dealt_round_robin_into_min_files_parts(tmp_path: Path) -> None:
    files = _write(tmp_path, 21, min_files=8, docs_per_pkl=100)
    start = first_part("00000", 8)
    assert [f.relpath for f in files] == [f"mmc4/p{j:02d}-00000-0000.pkl" for j in range(8)]
    loaded = {}
    for j, f in enumerate(files):
        docs = pickle.loads((tmp_path / f.relpath).read_bytes())
        count = int((tmp_path / f.relpath).with_suffix(".count").read_text())
        assert count == len(docs) == f.nsamples
        loaded[j] = [d["key"] for d in docs]
    # document i goes to part (i + start) % 8: 21 = 2*8 + 5, so five parts hold 3 and three hold 2
    for i in range(21):
        assert f"d{i:04d}" in loaded[(i + start) % 8]
    assert sorted(len(v) for v in loaded.values()) == [2, 2, 2, 3, 3, 3, 3, 3]
    assert sorted(k for v in loaded.values() for k in v) == [f"d{i:04d}" for i in range(21)]


def test_streamed_pickle_is_what_pickle_dumps_would_load(tmp_path: Path) -> None:
    files = _write(tmp_path / "a", 9, min_files=2, docs_per_pkl=100, batch=1)
    again = _write(tmp_path / "b", 9, min_files=2, docs_per_pkl=100, batch=9)
    assert files == again  # same bytes (sha256) whatever the batching
    data = (tmp_path / "a" / files[0].relpath).read_bytes()
    docs = pickle.loads(data)
    assert pickle.loads(pickle.dumps(docs, protocol=4)) == docs
    assert isinstance(docs, list) and all(isinstance(d, dict) and d["image_info"] for d in docs)


def test_chunks_roll_over_together_so_the_file_count_stays_a_multiple(tmp_path: Path) -> None:
    files = _write(tmp_path, 20, min_files=4, docs_per_pkl=2)  # chunks of 8 documents: 8 + 8 + 4
    assert len(files) == 12
    counts = {f.relpath: f.nsamples for f in files}
    assert [counts[f"mmc4/p{j:02d}-00000-{c:04d}.pkl"] for c in range(3) for j in range(4)] == [2] * 8 + [1] * 4
    ranks, _ = vila_rank_documents(str(tmp_path / "mmc4"), 4)
    assert ranks == [5, 5, 5, 5]


def test_no_documents_no_files_and_abort_leaves_nothing(tmp_path: Path) -> None:
    assert _write(tmp_path, 0, min_files=8, docs_per_pkl=5) == []
    w = Mmc4PklWriter(FS, str(tmp_path), "mmc4/00001", docs_per_pkl=5, min_files=8)
    w.write(make_table([doc_row(i, 1) for i in range(3)], DOCUMENT_SCHEMA))
    w.abort()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no pkl, no count, no temporary file


@pytest.fixture(scope="module")
def mmc4_run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart flow over the sample's MMC4 documents (2 input shards), default output settings."""
    tmp = tmp_path_factory.mktemp("mmc4layout")
    cfg = write_config(sample_dir, tmp / "out", tmp / "run.yaml", sources=["mmc4"],
                       stages=[{"type": "normalize"}, {"type": "dedup", "methods": ["exact", "minhash_documents"]}])
    run_local(load_config(cfg), progress=False)
    return tmp / "out"


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_rank_gets_documents_on_the_sample(mmc4_run: Path, world_size: int) -> None:
    folder = mmc4_run / "mmc4"
    inputs = sorted(p.stem for p in (mmc4_run / "_progress" / "mmc4").glob("*.json"))
    assert len(inputs) == 2
    pkls = sorted(p.name for p in folder.glob("*.pkl"))
    assert len(pkls) == 8 * len(inputs) and len(os.listdir(folder)) == 2 * len(pkls)
    ranks, files = vila_rank_documents(str(folder), world_size)
    total = sum(int(p.read_text()) for p in folder.glob("*.count"))
    assert total >= 8
    assert min(ranks) > 0, ranks
    assert max(ranks) - min(ranks) <= len(inputs)  # at most one document more per input shard
    assert sum(ranks) == total  # world sizes dividing 8: no file is left past the last rank
    # rank r reads the r-th share of parts, of every input shard
    per_rank = 8 // world_size
    for r, names in enumerate(files):
        assert {int(n[1:3]) for n in names} == set(range(r * per_rank, (r + 1) * per_rank))
        assert {n.split("-", 1)[1].rsplit("-", 1)[0] for n in names} == set(inputs)
    # validate prints the same figures and passes
    report = check_output(str(mmc4_run), world_sizes=[world_size])
    assert report.problems == []
    assert any(f"documents per rank {ranks}" in line for line in report.info), report.info

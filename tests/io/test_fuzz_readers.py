"""Seeded fuzzing of the readers and of whole runs over hostile copies of the sample's real files.

Seeds are small slices of what ``vila2-curate sample`` writes (an img2dataset tar + parquet, COYO parquet
with image bytes and with image paths, MMC4 jsonl, .jsonl.gz and .jsonl.zip). Each case applies seeded mutations: byte
level (bit flips, overwrites, truncation, deleted / duplicated spans, hostile tokens) and structure aware
(tar headers with hostile names, link types, sizes and a valid checksum; jsonl documents and parquet cells
with hostile values: invalid UTF-8, lone surrogates, references to a secret file outside the source, wrong
types, deep nesting). Invariants, per case:

- reading never raises anything but SourceFormatError (a clean one-line `error:` at run level);
- every row is kept, dropped with a reason or quarantined with a reason; jsonl: one row per line;
- a whole run over the cases of a kind completes, stats.json balances for every shard
  (rows_in = kept + dropped + quarantined) and agrees with the reader's row count;
- nothing is written outside the run's output folder, no output is a link, and the bytes of a secret
  file beside the source never reach any output (quarantine payloads included).

A fixed seed keeps CI deterministic; FUZZ_SEED / FUZZ_CASES in the environment explore further.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vila2_curate.pipelines.io.readers import make_reader
from vila2_curate.pipelines.io.readers.base import SourceFormatError
from vila2_curate.schemas.config import SourceConfig, parse_config

SEED = int(os.environ.get("FUZZ_SEED", "20261201"))
CASES = int(os.environ.get("FUZZ_CASES", "300"))  # split across the kinds below
# share of the cases per kind
KINDS = {"i2d_tar": 0.27, "i2d_parquet": 0.1, "coyo_bytes": 0.17, "coyo_paths": 0.13, "mmc4": 0.23,
         "mmc4_gz": 0.06, "mmc4_zip": 0.04}
SECRET_TOKEN = b"SECRET-TOKEN-5f3a9c1e"  # in a file beside the sources; must never reach an output


# ------------------------------------------------------------------------------------------- seeds


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sample (as `vila2-curate sample` writes it), seed slices of it, and a secret file outside."""
    from vila2_curate.pipelines.demo.sample import write_sample

    base = tmp_path_factory.mktemp("fuzz")
    sample = base / "sample"
    write_sample(str(sample), seed=0)
    outside = base / "outside"
    outside.mkdir()
    secret = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(secret, format="JPEG", comment=SECRET_TOKEN)
    (outside / "secret.jpg").write_bytes(secret.getvalue())

    # img2dataset: the first 3 samples of a real shard (+ their parquet rows and 2 failed downloads)
    keys: list[str] = []
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(sample / "img2dataset" / "00000.tar") as tf:
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == 3:
                    break
                keys.append(key)
            members.append((m, tf.extractfile(m).read()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    i2d_parquet = pq.read_table(sample / "img2dataset" / "00000.parquet")
    status = i2d_parquet.column("status").to_pylist()
    chosen = [i for i, k in enumerate(i2d_parquet.column("key").to_pylist()) if k in keys]
    chosen += [i for i, s in enumerate(status) if s != "success"][:2]
    i2d_parquet = i2d_parquet.take(sorted(chosen))

    docs = (sample / "mmc4" / "docs_shard_00000_v2.jsonl").read_bytes().splitlines()[:3]
    return {
        "base": base, "sample": sample, "secret": outside / "secret.jpg",
        "i2d_tar": buf.getvalue(), "i2d_parquet": _parquet_bytes(i2d_parquet),
        "coyo_bytes": pq.read_table(sample / "coyo" / "part-00000.parquet").slice(0, 3),
        "coyo_paths": pq.read_table(sample / "coyo" / "part-00001.parquet").slice(0, 3),
        "mmc4": docs,
    }


def _parquet_bytes(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


# ---------------------------------------------------------------------------------------- mutators


HOSTILE_TOKENS = [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b'"', b"\\", b"\\ud800", b"../", b"/", b".",
                  b"\n", b"{", b"]", b"NaN", b"1e999", b"-1", b"99999999999999999999"]


def mutate_bytes(rng: random.Random, data: bytes, n: int | None = None) -> bytes:
    """1-3 random byte-level edits (never grows the data by more than a few KB)."""
    b = bytearray(data)
    for _ in range(n or rng.randint(1, 3)):
        if not b:
            b += rng.choice(HOSTILE_TOKENS)
            continue
        op = rng.choice(["flip", "overwrite", "truncate", "delete", "duplicate", "insert"])
        i = rng.randrange(len(b))
        if op == "flip":
            for _ in range(rng.randint(1, 8)):
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
        elif op == "overwrite":
            tok = rng.choice(HOSTILE_TOKENS) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 16))
            b[i:i + len(tok)] = tok
        elif op == "truncate":
            del b[i:]
        elif op == "delete":
            del b[i:i + rng.randint(1, 512)]
        elif op == "duplicate":
            j = rng.randrange(len(b))
            b[j:j] = b[i:i + rng.randint(1, 1024)]
        else:
            b[i:i] = rng.choice(HOSTILE_TOKENS)
    return bytes(b)


def _ref_values(world: dict[str, Any]) -> list[Any]:
    secret = str(world["secret"])
    return [secret, "file://" + secret, "../outside/secret.jpg", "../../outside/secret.jpg",
            "images/../../outside/secret.jpg", "memory://x.jpg", "http://169.254.169.254/latest/meta-data/",
            "", "a\x00b.jpg", "\ud800.jpg", "images", ".", "~/.ssh/id_rsa", 5, None, ["x"]]


def _hostile_values(world: dict[str, Any]) -> list[Any]:
    return [None, "", 0, -1, 10**30, 1.5, float("nan"), True, "\ud800 lone", "x" * 5000, [], {}, [[[]]],
            {"a": [1, {"b": None}]}, "caf\u00e9 \u202e", *_ref_values(world)]


def mutate_tar(rng: random.Random, data: bytes, world: dict[str, Any]) -> bytes:
    """Edit one or two member headers (name, type, link, size, mode) and fix the checksum, so the
    structure itself is explored rather than only checksum rejection; sometimes byte edits too."""
    b = bytearray(data)
    headers = []
    off = 0
    while off + 512 <= len(b) and b[off:off + 512] != bytes(512):
        headers.append(off)
        size = int(b[off + 124:off + 136].strip(b"\x00 ") or b"0", 8)
        off += 512 + (size + 511) // 512 * 512
    for _ in range(rng.randint(1, 2)):
        h = rng.choice(headers)
        field = rng.choice(["name", "name", "type", "link", "size", "mode"])
        if field == "name":
            name = rng.choice([b"../outside/pwned.jpg", b"/etc/passwd", b"a/b.jpg", b"000000000.jpg",
                               b"\xff\xfe.txt", b"x" * 99, b".json", b"key..jpg", b"k.JPG", b"k.tar",
                               b"k.json.gz", b"./k.jpg", b"k.txt\x00hidden", b"\\evil.jpg"])
            b[h:h + 100] = name[:100].ljust(100, b"\x00")
        elif field == "type":
            b[h + 156:h + 157] = rng.choice([b"1", b"2", b"3", b"5", b"6", b"L", b"x", b"g", b"7", b"K", b"\x00"])
        elif field == "link":
            link = rng.choice([str(world["secret"]).encode(), b"../outside/secret.jpg", b"/etc/shadow"])
            b[h + 157:h + 257] = link[:100].ljust(100, b"\x00")
            b[h + 156:h + 157] = rng.choice([b"1", b"2"])
        elif field == "size":
            b[h + 124:h + 136] = rng.choice([b"77777777777\x00", b"00000000000\x00", b"-0000000001\x00",
                                             b"zzzzzzzzzzz\x00", b"\x80" + bytes(10) + b"\x01"])
        else:
            b[h + 100:h + 108] = rng.choice([b"0004755\x00", b"0000000\x00", b"garbage!"])
        chk = sum(b[h:h + 148]) + 8 * 32 + sum(b[h + 156:h + 512])
        b[h + 148:h + 156] = f"{chk:06o}\x00 ".encode()
    out = bytes(b)
    return mutate_bytes(rng, out) if rng.random() < 0.3 else out


def mutate_jsonl(rng: random.Random, lines: list[bytes], world: dict[str, Any]) -> bytes:
    """Hostile values in random fields of parsed documents, or raw byte edits of a line."""
    docs = [bytes(x) for x in lines]
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(docs))
        roll = rng.random()
        if roll < 0.25:
            docs[i] = mutate_bytes(rng, docs[i], 1)
            continue
        if roll < 0.3:
            docs[i] = rng.choice([b"[" * 100_000, b"[]", b'"str"', b"null", b"{}", b"\xef\xbb\xbf{}", b"{" + b"\xff" * 3])
            continue
        try:
            doc = json.loads(docs[i])
        except (ValueError, RecursionError):  # an earlier mutation made the line invalid or very deep
            continue
        if not isinstance(doc, dict):
            continue
        images = doc.get("image_info") if isinstance(doc.get("image_info"), list) else []
        target = rng.random()
        if images and target < 0.6 and isinstance(images[0], dict):
            img = rng.choice(images)
            if isinstance(img, dict):
                key = rng.choice(["image_name", "image_name", "matched_text_index", "matched_sim", "raw_url"])
                img[key] = rng.choice(_ref_values(world) if key == "image_name" else _hostile_values(world))
        else:
            key = rng.choice(["text_list", "image_info", "similarity_matrix", "url", "could_have_url_duplicate",
                              "extra"])
            doc[key] = rng.choice(_hostile_values(world) + [["\ud800"], [1, 2], [[float("nan")]], [None]])
        docs[i] = json.dumps(doc).encode()  # ensure_ascii: lone surrogates become "\ud800" escapes
    return b"\n".join(docs) + rng.choice([b"\n", b"", b"\n\n  \n"])


def broken_string_array(values: list[bytes | None]) -> pa.Array:
    """A ``string`` array holding raw bytes as given (invalid UTF-8 included), as a broken writer leaves it."""
    offsets = np.cumsum([0] + [len(v or b"") for v in values]).astype("int32")
    validity = pa.array([v is not None for v in values]).buffers()[1]
    data = pa.py_buffer(b"".join(v or b"" for v in values))
    return pa.Array.from_buffers(pa.string(), len(values), [validity, pa.py_buffer(offsets.tobytes()), data],
                                 null_count=sum(v is None for v in values))


def mutate_parquet(rng: random.Random, table: pa.Table, world: dict[str, Any], image_col: str) -> bytes:
    """Hostile cells (invalid UTF-8, refs outside the root, wrong keys, odd extra columns) or byte edits."""
    cols = {n: table.column(n).to_pylist() for n in table.column_names}
    broken: dict[str, dict[int, bytes]] = {}  # column -> row -> raw bytes stored in a `string` column
    n = table.num_rows
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        r = rng.randrange(n)
        if roll < 0.25:
            text_cols = [c for c, v in cols.items()
                         if isinstance(v, list) and all(isinstance(x, str | type(None)) for x in v)]
            if text_cols:
                broken.setdefault(rng.choice(text_cols), {})[r] = rng.choice(
                    [b"caf\xe9", b"\xff\xfe", b"\xed\xa0\x80", b"ok\xc3"])
        elif roll < 0.45 and image_col in cols:
            if image_col == "image":
                cols[image_col][r] = rng.choice([None, b"", b"\xff\xd8\xff" + rng.randbytes(64),
                                                 world["secret"].read_bytes()[:20], (cols[image_col][r] or b"")[:100]])
            else:
                v = rng.choice(_ref_values(world))
                cols[image_col][r] = v if isinstance(v, str) or v is None else str(v)
        elif roll < 0.6:
            cols["id"][r] = rng.choice([None, cols["id"][(r + 1) % n], "../../k", "\ud800", "k" * 300])
        elif roll < 0.75:
            cols[rng.choice(["tags", "nested", "when"])] = rng.choice([
                [["a", "\ud800"][: rng.randint(0, 2)] for _ in range(n)],
                [{"x": 1, "y": "s"} for _ in range(n)],
                [float("nan")] * n,
                ("__dictionary__", [rng.choice([b"en", b"e\xff", b""]) for _ in range(n)]),
            ])
        else:
            return mutate_bytes(rng, _parquet_bytes(table))
    arrays = {}
    for name, values in cols.items():
        if isinstance(values, tuple):  # a categorical text column, read back as dictionary<string>
            arrays[name] = pa.DictionaryArray.from_arrays(
                pa.array(range(n), pa.int32()), broken_string_array(values[1]))
            continue
        if name in broken and all(isinstance(x, str | type(None)) for x in values):
            raw = [None if v is None else v.encode("utf-8", "surrogatepass") for v in values]
            arrays[name] = broken_string_array([broken[name].get(i, v) for i, v in enumerate(raw)])
            continue
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowException, UnicodeEncodeError):  # a lone surrogate: store its UTF-8 bytes as text
            arrays[name] = broken_string_array(
                [None if v is None else str(v).encode("utf-8", "surrogatepass") for v in values])
    return _parquet_bytes(pa.table(arrays))


# -------------------------------------------------------------------------------------------- cases


def make_cases(world: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Write every mutated file under root/<kind>/<i>/ and return the case list (deterministic)."""
    rng = random.Random(SEED)
    cases = []
    for kind, share in KINDS.items():
        for i in range(max(1, round(CASES * share))):
            folder = root / kind / f"{i:03d}"
            folder.mkdir(parents=True)
            case_rng = random.Random(rng.getrandbits(64))
            if kind == "i2d_tar":
                (folder / "shard.tar").write_bytes(mutate_tar(case_rng, world["i2d_tar"], world))
                (folder / "shard.parquet").write_bytes(world["i2d_parquet"])
                path = folder / "shard.tar"
            elif kind == "i2d_parquet":
                (folder / "shard.tar").write_bytes(world["i2d_tar"])
                table = pq.read_table(io.BytesIO(world["i2d_parquet"]))
                data = (mutate_bytes(case_rng, world["i2d_parquet"]) if case_rng.random() < 0.5
                        else mutate_parquet(case_rng, table.rename_columns(
                            ["id" if c == "key" else c for c in table.column_names]), world, "url"))
                if data[:4] == b"PAR1":  # back to img2dataset's `key` column where the mutant still reads
                    try:
                        t = pq.read_table(io.BytesIO(data))
                        data = _parquet_bytes(t.rename_columns(["key" if c == "id" else c for c in t.column_names]))
                    except Exception:  # noqa: BLE001, S110 - an unreadable mutant stays as it is
                        pass
                (folder / "shard.parquet").write_bytes(data)
                path = folder / "shard.tar"
            elif kind in ("coyo_bytes", "coyo_paths"):
                col = "image" if kind == "coyo_bytes" else "image_path"
                path = folder / "part.parquet"
                path.write_bytes(mutate_parquet(case_rng, world[kind], world, col))
            else:
                data = mutate_jsonl(case_rng, world["mmc4"], world)
                if kind == "mmc4_gz":
                    gz = gzip.compress(data, mtime=0)
                    data = mutate_bytes(case_rng, gz, 1) if case_rng.random() < 0.5 else gz
                    path = folder / "docs.jsonl.gz"
                elif kind == "mmc4_zip":  # allenai/mmc4 ships docs_*.jsonl.zip
                    buf = io.BytesIO()
                    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                        z.writestr(zipfile.ZipInfo("docs.jsonl", (2020, 1, 1, 0, 0, 0)), data)
                    data = mutate_bytes(case_rng, buf.getvalue(), 1) if case_rng.random() < 0.5 else buf.getvalue()
                    path = folder / "docs.jsonl.zip"
                else:
                    path = folder / "docs.jsonl"
                path.write_bytes(data)
            cases.append({"kind": kind, "index": i, "path": path})
    return cases


def source_for(kind: str, paths: list[str], world: dict[str, Any]) -> dict[str, Any]:
    sample = world["sample"]
    if kind.startswith("i2d"):
        return {"name": kind, "kind": "img2dataset", "paths": paths}
    if kind == "coyo_bytes":
        return {"name": kind, "kind": "coyo_parquet", "paths": paths, "image_column": "image"}
    if kind == "coyo_paths":
        return {"name": kind, "kind": "coyo_parquet", "paths": paths, "image_path_column": "image_path",
                "image_root": str(sample / "coyo")}
    return {"name": kind, "kind": "mmc4", "paths": paths, "image_dir": str(sample / "mmc4")}


def read_case(case: dict[str, Any], world: dict[str, Any]) -> tuple[str, int]:
    """Read one case through its reader; ("ok", rows) or ("source_format_error", 0). Checks row invariants."""
    source = SourceConfig(**source_for(case["kind"], [str(case["path"])], world))
    try:
        reader = make_reader(source)
        shards = reader.list_shards()
        rows = 0
        for shard in shards:
            for table in reader.read(shard, batch_size=2):
                check_rows(table, case)
                rows += table.num_rows
    except SourceFormatError:
        return "source_format_error", 0
    if case["kind"] == "mmc4":
        lines = [ln for ln in case["path"].read_bytes().split(b"\n") if ln.strip()]
        assert rows == len(lines), (case, rows, len(lines))  # one row per non-blank line, hostile or not
    return "ok", rows


def check_rows(table: pa.Table, case: dict[str, Any]) -> None:
    for row in table.select([c for c in table.column_names if c != "embedding"]).to_pylist():
        if row["quarantined"]:
            assert row["drop_reason"], (case, row["key"])
        if row["drop_reason"] is not None:
            assert row["drop_stage"], (case, row["key"])
        assert SECRET_TOKEN not in (row.get("image") or b""), (case, row["key"], "secret read")
        for im in row.get("image_info") or []:
            assert SECRET_TOKEN not in (im.get("image") or b""), (case, row["key"], "secret read")


def tree_snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under root except under ``skip``: (size, mtime_ns), links included as links."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            snap[str(p)] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0)
    return snap


# -------------------------------------------------------------------------------------------- tests


def test_fuzz_readers_and_runs(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    from vila2_curate.pipelines.cli import run

    cases = make_cases(world, tmp_path / "in")
    outcomes: Counter = Counter()
    rows_by_path: dict[str, int] = {}
    for case in cases:
        outcome, rows = read_case(case, world)
        outcomes[f"{case['kind']}:{outcome}"] += 1
        if outcome == "ok":
            rows_by_path[str(case["path"])] = rows

    # whole runs: one per kind over every case the reader accepted, each case one input shard
    reasons: Counter = Counter()
    watched = world["base"]  # the sample, the secret and every case live here; only out/ may change
    for kind in KINDS:
        paths = sorted(p for p in rows_by_path if f"/{kind}/" in p)
        if not paths:
            continue
        out = tmp_path / "out" / kind
        raw = {"name": f"fuzz-{kind}", "sources": [source_for(kind, paths, world)],
               "stages": [{"type": "normalize", "min_side": 1, "max_aspect": 100.0}],
               "output": {"path": str(out), "shard_max_samples": 16}, "batch_size": 4}
        before = tree_snapshot(watched, tmp_path / "out")
        before_in = tree_snapshot(tmp_path / "in", tmp_path / "out")
        stats = run(parse_config(raw), progress=False)
        assert tree_snapshot(watched, tmp_path / "out") == before  # nothing written beside the output
        assert tree_snapshot(tmp_path / "in", tmp_path / "out") == before_in
        assert stats["balanced"]
        on_disk = json.loads((out / "stats.json").read_text())
        assert len(on_disk["shards"]) == len(paths)
        for shard in on_disk["shards"]:
            assert shard["rows_in"] == shard["kept"] + shard["dropped"] + shard["quarantined"], shard
            assert sum(shard["reasons"].values()) == shard["dropped"] + shard["quarantined"], shard
        assert sum(s["rows_in"] for s in on_disk["shards"]) == sum(rows_by_path[p] for p in paths)
        for p in out.rglob("*"):
            assert not p.is_symlink(), p
            assert out.resolve() in p.resolve().parents
            if p.is_file():
                assert SECRET_TOKEN not in p.read_bytes(), f"secret bytes in {p}"
        reasons.update(on_disk["total"]["reasons"])

    with capsys.disabled():  # shown even under capture: the log records how many cases ran and their outcomes
        print(f"\nfuzz seed={SEED} cases={len(cases)} outcomes={dict(sorted(outcomes.items()))}")
        print(f"fuzz reasons={dict(reasons.most_common())}")
    assert len(cases) >= CASES * 0.95
    # the mutators must reach the paths they target, not only be rejected wholesale
    assert sum(v for k, v in outcomes.items() if k.endswith(":ok")) >= 0.8 * len(cases)
    for expected in ("read:invalid_utf8", "read:image_path_unsafe", "read:invalid_json"):
        assert reasons[expected] > 0, (expected, reasons)

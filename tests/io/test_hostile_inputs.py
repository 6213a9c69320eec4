"""Hostile and broken input: invalid text quarantines its row and the rest of the
file goes on; configuration and source-format errors end with one `error:` line and exit 2; a source
whose references mostly fail is flagged on screen, in stats.json and in the report.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from vila2_curate.pipelines.io.readers import SourceFormatError, make_reader
from vila2_curate.schemas.config import SourceConfig

ROOT = Path(__file__).resolve().parents[2]


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def broken_string_array(values: list[bytes | None]) -> pa.Array:
    """A pyarrow ``string`` array holding the raw bytes as given, invalid UTF-8 included: what a writer
    that skips validation (or a bit flip in a data page) leaves in a parquet ``string`` column."""
    offsets = np.cumsum([0] + [len(v or b"") for v in values]).astype("int32")
    validity = pa.array([v is not None for v in values]).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [validity, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(v or b"" for v in values))],
                                 null_count=sum(v is None for v in values))


def read_rows(source: SourceConfig) -> list[dict[str, Any]]:
    reader = make_reader(source)
    rows: list[dict[str, Any]] = []
    for shard in reader.list_shards():
        for table in reader.read(shard, batch_size=4):
            rows.extend(table.to_pylist())
    return rows


def write_tar(path: Path, members: list[tuple[str | bytes, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name if isinstance(name, str) else name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------ point 3: text


def test_coyo_parquet_invalid_utf8_in_string_columns_quarantines_only_those_rows(tmp_path: Path) -> None:
    texts = [b"a fine caption", b"caf\xe9 cp1252", b"ok again", b"\xed\xa0\x80 encoded surrogate", None]
    urls = [b"http://x/0", b"http://x/1", b"http://x/\xff2", b"http://x/3", b"http://x/4"]
    table = pa.table({"id": [str(i) for i in range(5)], "text": broken_string_array(texts),
                      "url": broken_string_array(urls), "image": [jpeg()] * 5,
                      "tags": pa.array([["a"], ["b"], ["c"], ["d"], ["e"]]),
                      # a categorical column (read back as dictionary<string>) with one invalid value
                      "lang": pa.DictionaryArray.from_arrays(pa.array([0, 0, 0, 0, 1], pa.int32()),
                                                             broken_string_array([b"en", b"e\xff"]))})
    with pytest.raises(pa.ArrowInvalid):  # the file really holds invalid UTF-8 in `string` columns
        table.column("text").validate(full=True)
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=5)
    assert pq.read_schema(tmp_path / "part-0.parquet").field("text").type == pa.string()

    rows = read_rows(SourceConfig(name="coyo", kind="coyo_parquet", paths=[str(tmp_path / "part-0.parquet")],
                                  image_column="image"))
    got = {r["key"]: r for r in rows}
    assert len(rows) == 5  # every row accounted for; the good ones are untouched
    assert got["0"]["drop_reason"] is None and got["0"]["text"] == "a fine caption"
    assert got["4"]["drop_reason"] == "invalid_utf8: lang" and got["4"]["text"] == ""
    assert json.loads(got["4"]["meta"])["lang"] == "e\ufffd" and json.loads(got["0"]["meta"])["lang"] == "en"
    assert got["1"]["drop_reason"] == "invalid_utf8: text" and got["1"]["quarantined"]
    assert got["1"]["text"] == "caf\ufffd cp1252"  # kept for inspection, with U+FFFD for the bad bytes
    assert got["1"]["image"] == jpeg()
    assert got["2"]["drop_reason"] == "invalid_utf8: url" and got["2"]["url"] is None
    assert got["3"]["drop_reason"] == "invalid_utf8: text"


def test_img2dataset_parquet_and_json_invalid_utf8(tmp_path: Path) -> None:
    img = jpeg()
    write_tar(tmp_path / "00000.tar", [
        ("000.jpg", img), ("000.json", json.dumps({"key": "000", "url": "u0"}).encode()), ("000.txt", b"fine"),
        ("001.jpg", img), ("001.json", b'{"key": "001", "url": "u\xff1"}'), ("001.txt", b"fine"),
        ("002.jpg", img), ("002.json", b'{"key": "002", "caption": "lone \\udc80 surrogate"}'),
        ("003.jpg", img), ("003.json", b'{"key": "003"}'), ("003.txt", b"caption \x81\x82"),
        (b"00\xff4.jpg", img),  # a member name that is not UTF-8
    ])
    statuses = ["success"] * 4 + ["failed_to_download"] * 2
    pq.write_table(pa.table({
        "key": ["000", "001", "002", "003", "005", "006"],
        "caption": broken_string_array([b"fine", b"fine", b"x", b"y", b"bad \xc3", b"good"]),
        "status": statuses, "url": [f"u{i}" for i in range(6)]}), tmp_path / "00000.parquet")

    rows = read_rows(SourceConfig(name="i2d", kind="img2dataset", paths=[str(tmp_path / "00000.tar")]))
    by_source_key = {r["source_key"] or r["key"]: r for r in rows}
    assert len(rows) == 7  # 5 tar samples + 2 failed parquet rows
    assert by_source_key["000"]["drop_reason"] is None
    assert by_source_key["001"]["drop_reason"] == "invalid_utf8: json"
    assert by_source_key["002"]["drop_reason"] == "invalid_utf8: text"  # caption from json, escaped
    assert by_source_key["002"]["text"] == "lone \\udc80 surrogate"
    assert by_source_key["003"]["drop_reason"] == "caption_not_utf8"  # the existing .txt reason
    odd = [r for r in rows if r["key"].startswith("00_4")]
    assert len(odd) == 1 and odd[0]["drop_reason"] == "invalid_utf8: source_key"
    assert odd[0]["source_key"] == "00\\udcff4"
    assert by_source_key["005"]["drop_reason"] == "invalid_utf8: caption" and by_source_key["005"]["quarantined"]
    assert by_source_key["006"]["drop_reason"] == "img2dataset_failed_to_download"


def test_mmc4_invalid_utf8_lines_and_surrogates(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    good = {"url": "http://d/0", "text_list": ["one", "two"],
            "image_info": [{"image_name": "a.jpg", "matched_text_index": 0}]}
    lines = [json.dumps(good).encode(),
             b'{"url": "http://d/1", "text_list": ["caf\xe9"], "image_info": []}',
             b'{"url": "http://d/2", "text_list": ["\\ud800 alone"], "image_info": []}',
             json.dumps({**good, "url": "http://d/3"}).encode()]
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = read_rows(SourceConfig(name="mmc4", kind="mmc4", paths=[str(tmp_path / "docs.jsonl")]))
    assert [r["drop_reason"] for r in rows] == [None, "invalid_utf8: line", "invalid_utf8: text_list", None]
    assert rows[2]["text_list"] == ["\\ud800 alone"] and rows[2]["quarantined"]
    assert rows[3]["image_info"][0]["image"] == (tmp_path / "a.jpg").read_bytes()


# --------------------------------------------------------------------- point 4: one-line errors


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from vila2_curate.pipelines.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _config(tmp_path: Path, sources: list[dict[str, Any]], name: str = "run.yaml", **extra: Any) -> Path:
    raw = {"name": "hostile", "sources": sources, "stages": [{"type": "normalize", "min_side": 1}],
           "output": {"path": str(tmp_path / "out")}, **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _coyo_without_url(tmp_path: Path) -> Path:
    pq.write_table(pa.table({"id": ["1"], "text": ["t"], "image_path": ["a.jpg"]}), tmp_path / "p.parquet")
    return _config(tmp_path, [{"name": "coyo", "kind": "coyo_parquet", "paths": [str(tmp_path / "p.parquet")],
                               "image_path_column": "url"}], name="nourl.yaml")


def test_config_and_source_errors_are_one_line_with_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("name: x\nsources: [\n  - broken\n")
    unknown = _config(tmp_path, [], name="unknown.yaml")
    unknown.write_text(unknown.read_text().replace("min_side: 1", "min_side: 1\n  min_sidez: 3"))
    nopath = _config(tmp_path, [{"name": "m", "kind": "mmc4", "paths": [str(tmp_path / "nowhere" / "*.jsonl")]}],
                     name="nopath.yaml")
    cases = {
        str(tmp_path / "bad.yaml"): ["bad.yaml", "not valid YAML at line 3, column 3"],
        str(unknown): ["unknown.yaml", "stages.0.normalize.min_sidez", "Extra inputs are not permitted"],
        str(tmp_path / "missing.yaml"): ["missing.yaml", "cannot read the config file"],
        str(nopath): ["nowhere", "matched no"],
        str(_coyo_without_url(tmp_path)): ["p.parquet", "missing required column 'url'",
                                          "url_column and image_path_column"],
    }
    for config, words in cases.items():
        code, out, err = _cli(capsys, "run", config, "--no-progress")
        assert code == 2, (config, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        assert all(w in err for w in words), (words, err)
        if "p.parquet" in err:
            assert err.count("'url'") == 1  # the column is named once, with both settings that name it
    code, _, err = _cli(capsys, "run", str(tmp_path / "nourl.yaml"), "--no-progress", "-v")
    assert code == 2 and "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("error: ")


def test_console_script_exit_status_and_wrapped_errors(tmp_path: Path) -> None:
    from vila2_curate.pipelines.cli import describe_error
    from vila2_curate.pipelines.io.readers.base import SourceFormatError

    proc = subprocess.run([sys.executable, "-m", "vila2_curate.pipelines.cli", "run", str(_coyo_without_url(tmp_path))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1

    class WorkerError(RuntimeError):  # how Ray (RayTaskError.cause) and Beam (raise ... from) wrap it
        def __init__(self, cause: BaseException) -> None:
            super().__init__("task failed\nremote traceback ...")
            self.cause = cause

    # Ray Data appends its retry advice to the cause's message after a newline; the line stays one line
    ray_like = WorkerError(SourceFormatError("f.parquet: missing required column 'x'\nFailed to apply UDF ..."))
    assert describe_error(ray_like) == (2, "f.parquet: missing required column 'x'")
    try:
        try:
            open(tmp_path / "no" / "such")  # noqa: SIM115
        except OSError as e:
            raise RuntimeError("stage failed") from e
    except RuntimeError as wrapped:
        code, message = describe_error(wrapped)
    assert code == 4 and "FileNotFoundError" in message and "such" in message
    assert describe_error(KeyError("bug")) == (1, "KeyError: 'bug'")


# ------------------------------------------------------------------ point 5: failing sources flagged


def _mmc4_source(tmp_path: Path, n_docs: int = 10) -> dict[str, Any]:
    """n_docs documents with one image each; the images exist in images/, only one of them in wrong/."""
    (tmp_path / "images").mkdir()
    (tmp_path / "wrong").mkdir()
    lines = []
    for i in range(n_docs):
        Image.new("RGB", (32, 32), (i * 20, 40, 90)).save(tmp_path / "images" / f"{i}.jpg")
        lines.append(json.dumps({"url": f"http://d/{i}", "text_list": [f"document {i} sentence"],
                                 "image_info": [{"image_name": f"{i}.jpg", "matched_text_index": 0}]}))
    (tmp_path / "wrong" / "0.jpg").write_bytes((tmp_path / "images" / "0.jpg").read_bytes())
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return {"name": "mmc4", "kind": "mmc4", "paths": [str(tmp_path / "docs.jsonl")],
            "image_dir": str(tmp_path / "wrong")}


def test_source_with_most_references_failing_is_flagged(tmp_path: Path, capsys) -> None:
    from vila2_curate.pipelines.report import render_report

    source = _mmc4_source(tmp_path)
    config = _config(tmp_path, [source])
    code, out, err = _cli(capsys, "run", str(config), "--no-progress")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["balanced"]
    assert (f"warning: source 'mmc4': image_dir probably wrong: 9 of 10 image references not found under "
            f"{tmp_path / 'wrong'} (90% of references failed)") in err
    health = json.loads((tmp_path / "out" / "stats.json").read_text())["sources"]["mmc4"]["health"]
    assert health == {"status": "warning", "references": 10, "failed": 9, "failed_share": 0.9,
                      "failures": {"image_missing": 9},
                      "cause": "image_dir probably wrong: 9 of 10 image references not found"}
    html = render_report([str(tmp_path / "out")], gallery=0)
    assert "id='source-health'" in html and "image_dir probably wrong: 9 of 10" in html

    code, out, err = _cli(capsys, "inputs", str(config), "--probe", "5")
    probe = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and probe["input_shards"] == 1
    assert probe["references"]["mmc4"] == {"checked": 5, "found": 1, "failures": {"image_missing": 4},
                                           "status": "warning",
                                           "cause": "image_dir probably wrong: 4 of 5 image references not found"}
    assert "source 'mmc4': 1 of 5 image references found" in err and "warning: source 'mmc4'" in err

    fixed = _config(tmp_path, [{**source, "image_dir": str(tmp_path / "images")}], name="fixed.yaml")
    code, out, err = _cli(capsys, "inputs", str(fixed))
    assert code == 0 and "warning" not in err
    assert json.loads(out.strip().splitlines()[-1])["references"]["mmc4"]["found"] == 10


# ------------------------------------------------------- point 6: what the fuzz test found (regressions)


def _tar_header(name: bytes, size_field: bytes, typeflag: bytes = b"0") -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\x00"
    h[124:136] = size_field
    h[156:157] = typeflag
    h[257:263] = b"ustar\x00"
    h[148:156] = f"{sum(h[:148]) + 256 + sum(h[156:]):06o}\x00 ".encode()
    return bytes(h)


def test_tar_with_hostile_headers_is_quarantined_not_a_crash(tmp_path: Path) -> None:
    """Fuzz findings: a pax header whose payload is not pax records and a size field that is not a number
    raised ValueError out of the reader (the run ended); a size of 8 GiB asked for one 8 GiB read."""
    img = jpeg()

    def member(name: bytes, data: bytes, typeflag: bytes = b"0") -> bytes:
        return _tar_header(name, f"{len(data):011o}\x00".encode(), typeflag) + data.ljust(-(-len(data) // 512) * 512, b"\0")

    prefix = member(b"000.jpg", img) + member(b"000.txt", b"fine")
    cases = {
        "pax.tar": prefix + member(b"PaxHeader", b"not pax records at all", b"x") + member(b"001.jpg", img)
        + bytes(1024),
        "size.tar": prefix + _tar_header(b"001.jpg", b"zzzzzzzzzzz\x00") + bytes(1024),
        "huge.tar": prefix + _tar_header(b"001.jpg", b"77777777777\x00") + img + bytes(1024),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        rows = read_rows(SourceConfig(name="i2d", kind="img2dataset", paths=[str(tmp_path / name)]))
        by_key = {r["source_key"] or r["key"]: r for r in rows}
        assert by_key["000"]["image"] == img, name  # what came before the bad header is read
        if name == "pax.tar":  # malformed pax records are ignored; the member after them is read
            assert by_key["000"]["drop_reason"] is None
            assert by_key["001"]["drop_reason"] is None and by_key["001"]["image"] == img
        else:  # the stream breaks at the bad header: the sample before it is quarantined as possibly cut
            assert [r["drop_reason"] for r in rows] == ["tar_truncated"] * 2, name  # + the lost rest


def _corrupt_second_row_group(path: Path) -> None:
    meta = pq.ParquetFile(path).metadata
    offset = meta.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 24] = b"\xff" * 24
    path.write_bytes(bytes(data))


def test_corrupt_parquet_pages_quarantine_the_rest_of_the_shard(tmp_path: Path) -> None:
    """Fuzz findings: a corrupt data page in a parquet ended the run with OSError (exit 4, as if the disk
    failed); a coyo parquet without a footer as the first shard gave a traceback (exit 1). Now the broken
    row group is one quarantined row and the other row groups are read."""
    coyo = tmp_path / "coyo"
    coyo.mkdir()
    pq.write_table(pa.table({"id": [str(i) for i in range(4)], "text": ["t"] * 4, "url": ["u"] * 4,
                             "image": [jpeg()] * 4}), coyo / "a.parquet", row_group_size=2, compression="none")
    _corrupt_second_row_group(coyo / "a.parquet")
    rows = read_rows(SourceConfig(name="coyo", kind="coyo_parquet", paths=[str(coyo / "a.parquet")],
                                  image_column="image"))
    assert [r["drop_reason"] for r in rows] == [None, None, "parquet_corrupt"]  # row group 0 stands
    assert json.loads(rows[2]["meta"])["rows_lost"] == 2

    i2d = tmp_path / "i2d"
    i2d.mkdir()
    write_tar(i2d / "00000.tar", [("000.jpg", jpeg()), ("000.txt", b"fine")])
    pq.write_table(pa.table({"key": ["000", "001", "002", "003"], "status": ["success"] + ["failed_to_download"] * 3,
                             "url": ["u"] * 4}), i2d / "00000.parquet", row_group_size=2, compression="none")
    _corrupt_second_row_group(i2d / "00000.parquet")
    rows = read_rows(SourceConfig(name="i2d", kind="img2dataset", paths=[str(i2d / "00000.tar")]))
    assert [r["drop_reason"] for r in rows] == [None, "img2dataset_failed_to_download", "parquet_corrupt"]

    # no footer, or a footer whose column names are not UTF-8 (pyarrow raised UnicodeDecodeError): a
    # source error naming the file (one `error:` line, exit 2), not a traceback
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["1"], "text": ["t"], "url": ["u"], "image": [b"x"], "zzname": [1]}), buf,
                   store_schema=False)
    for data in (b"PAR1 no footer", buf.getvalue().replace(b"zzname", b"\xa0zname")):
        (coyo / "a.parquet").write_bytes(data)
        with pytest.raises(SourceFormatError, match="a.parquet is not a readable parquet file"):
            make_reader(SourceConfig(name="coyo", kind="coyo_parquet", paths=[str(coyo / "a.parquet")],
                                     image_column="image")).list_shards()


def test_edited_round_input_quarantines_rows_with_wrong_types(tmp_path: Path) -> None:
    """A round reads our own output back; an edited sample json (wrong types, a list, a bad pHash) must
    cost that sample only. Values Arrow refuses are caught where every reader builds its tables."""
    img = jpeg()
    (tmp_path / "src").mkdir()
    infos = {"good": {"text": "fine", "clip_score": 0.5}, "score": {"clip_score": "high"},
             "captions": {"captions": [1, 2]}, "phash": {"phash": "zz"}, "list": [1, 2],
             "width": {"width": "wide"}, "flags": {"flags": "not a list"}, "text": {"text": ["a list"]}}
    members = []
    for key, info in infos.items():
        members += [(f"{key}.jpg", img), (f"{key}.json", json.dumps(info).encode())]
    write_tar(tmp_path / "src" / "00000.tar", members)
    (tmp_path / "wids-meta.json").write_text(json.dumps({"shardlist": [{"url": "src/00000.tar"}]}))
    rows = read_rows(SourceConfig(name="prev", kind="vila_wds", paths=[str(tmp_path)]))
    got = {r["key"]: r["drop_reason"] for r in rows}
    assert got == {"good": None, "score": "invalid_value", "captions": "json_invalid: captions",
                   "phash": "json_invalid: phash", "list": "json_invalid: not an object",
                   "width": None, "flags": "json_invalid: flags", "text": "invalid_value"}
    assert next(r for r in rows if r["key"] == "width")["width"] is None  # not an int: unknown, as elsewhere


def test_corrupt_compressed_jsonl_is_one_quarantined_row(tmp_path: Path) -> None:
    """allenai/mmc4 ships .jsonl.zip; a cut or corrupt zip raised BadZipFile (not an OSError) out of the
    reader and ended the run. Now, like a cut .gz, it is one jsonl_truncated row with the error."""
    import zipfile

    doc = json.dumps({"url": "u", "text_list": ["a"], "image_info": []})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("d.jsonl", "\n".join([doc] * 20))
    data = buf.getvalue()
    for name, broken in {"cut.jsonl.zip": data[: len(data) // 2],
                         "crc.jsonl.zip": data[:40] + b"\xff" * 20 + data[60:]}.items():
        (tmp_path / name).write_bytes(broken)
        rows = read_rows(SourceConfig(name="m", kind="mmc4", paths=[str(tmp_path / name)]))
        assert [r["drop_reason"] for r in rows] == ["jsonl_truncated"], name
        assert "BadZipFile" in json.loads(rows[0]["meta"])["error"]


def test_source_health_causes() -> None:
    """The likely cause follows the largest group of failing references; a source that kept nothing is
    flagged even when its references resolved."""
    from vila2_curate.pipelines.engine.health import source_health, warning_lines

    urls = source_health({"rows_in": 10, "kept": 2, "reasons": {"read:failed_to_download": 7, "read:opt_out": 1}})
    assert urls["status"] == "warning" and urls["failed"] == 7  # opt-outs are the site's choice, not failures
    assert urls["cause"].startswith("7 of 10 image references could not be downloaded")
    unsafe = source_health({"rows_in": 4, "kept": 0, "reasons": {"read:image_path_unsafe": 4}})
    assert "fetch_remote: true" in unsafe["cause"] and unsafe["failed_share"] == 1.0
    lost = source_health({"rows_in": 4, "kept": 1, "reasons": {"read:missing_from_tar": 3}})
    assert lost["cause"].startswith("shards incomplete")
    nothing = source_health({"rows_in": 5, "kept": 0, "reasons": {"normalize:too_small": 5}})
    assert nothing == {"status": "warning", "references": 5, "failed": 0, "failed_share": 0.0, "failures": {},
                       "cause": "no row of 5 kept (see reasons)"}
    ok = source_health({"rows_in": 10, "kept": 9, "reasons": {"read:image_missing": 1}})
    assert ok["status"] == "ok" and "cause" not in ok
    assert warning_lines({"sources": {"a": {"rows_in": 10, "kept": 9, "health": ok}}}) == []


def test_url_source_with_dead_links_is_flagged_and_probed_cheaply(tmp_path: Path, capsys) -> None:
    """A URL-only COYO source (fetch_remote) whose links are mostly dead: `inputs` probes 20 of them through
    the real fetcher and fails, the run flags the source on screen and in stats.json."""
    from tests.helpers.loopback_http import LoopbackServer

    img = jpeg(size=32)
    n = 300
    with LoopbackServer({f"/{i}.jpg": [(200, {"Content-Type": "image/jpeg"}, img)] for i in range(0, n, 10)},
                        max_requests=2 * n) as server:
        pq.write_table(pa.table({"id": [str(i) for i in range(n)], "text": [f"t {i}" for i in range(n)],
                                 "url": [server.url(f"/{i}.jpg") for i in range(n)]}), tmp_path / "urls.parquet")
        source = {"name": "coyo", "kind": "coyo_parquet", "paths": [str(tmp_path / "urls.parquet")],
                  "image_path_column": "url", "fetch_remote": True, "allow_private_networks": True,
                  "fetch": {"retries": 0, "timeout_s": 5}}
        config = _config(tmp_path, [source])
        code, out, err = _cli(capsys, "inputs", str(config), "--probe", "20")
        probe = json.loads(out.strip().splitlines()[-1])["references"]["coyo"]
        assert code == 1 and probe["checked"] == 20 and probe["found"] == 2, probe
        assert probe["failures"] == {"failed_to_download": 18}
        assert len(server.paths_requested()) <= 60  # a probe, not a download of the source

        code, out, err = _cli(capsys, "run", str(config), "--no-progress")
        assert code == 0
        assert "warning: source 'coyo': 270 of 300 image references could not be downloaded" in err
        health = json.loads((tmp_path / "out" / "stats.json").read_text())["sources"]["coyo"]["health"]
        assert health["failures"] == {"failed_to_download": 270} and health["status"] == "warning"

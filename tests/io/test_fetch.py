"""The guarded fetcher against a real loopback HTTP server: opt-out headers, retries,
byte cap, redirects, private-address refusal, and a URL-only COYO parquet read end to end with exact
accounting."""

from __future__ import annotations

import io
import ipaddress
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers.loopback_http import LoopbackServer
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.io.readers import SourceFormatError, make_reader
from vila2_curate.pipelines.io.readers.fetch import (
    FAILED,
    OPT_OUT,
    REFUSED,
    SUCCESS,
    TOO_LARGE,
    Fetcher,
    address_is_public,
    opt_out_directive,
)
from vila2_curate.schemas.config import FetchConfig, SourceConfig, load_config

FAST = FetchConfig(threads=4, timeout_s=5.0, retries=2, backoff_s=0.01, max_backoff_s=0.05)
DISALLOWED = frozenset({"noai", "noimageai", "noindex", "noimageindex"})


def jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize(size).save(buf, format="JPEG")
    return buf.getvalue()


def ok(body: bytes, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "image/jpeg", **headers}, body


def test_opt_out_directives_follow_img2dataset() -> None:
    assert opt_out_directive(["noai"], "vila2-curate", DISALLOWED) == "noai"
    assert opt_out_directive(["noindex, nofollow"], "vila2-curate", DISALLOWED) == "noindex"
    assert opt_out_directive(["NoImageAI"], "vila2-curate", DISALLOWED) == "noimageai"
    assert opt_out_directive(["vila2-curate: noimageindex"], "vila2-curate", DISALLOWED) == "noimageindex"
    assert opt_out_directive(["otherbot: noai"], "vila2-curate", DISALLOWED) is None  # scoped to another agent
    assert opt_out_directive(["nofollow", "noarchive"], "vila2-curate", DISALLOWED) is None
    # a directive with a value (unavailable_after: <date>) is not a user-agent scope
    assert opt_out_directive(["noindex, unavailable_after: 25 Jun 2010"], "vila2-curate", DISALLOWED) == "noindex"


@pytest.mark.parametrize("addr,public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fc00::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:169.254.169.254", False), ("64:ff9b::a00:1", False), ("2002:7f00:1::", False),
    ("8.8.8.8", True), ("151.101.1.69", True), ("2606:4700:4700::1111", True),
])
def test_address_policy(addr: str, public: bool) -> None:
    assert address_is_public(ipaddress.ip_address(addr)) is public


def test_fetch_statuses_against_loopback_server() -> None:
    big = jpeg(9, (1600, 1200))
    routes = {
        "/ok.jpg": [ok(jpeg(1))],
        "/noai.jpg": [ok(jpeg(2), **{"X-Robots-Tag": "noai"})],
        "/scoped.jpg": [ok(jpeg(3), **{"X-Robots-Tag": "vila2-curate: noimageai"})],
        "/otherbot.jpg": [ok(jpeg(4), **{"X-Robots-Tag": "otherbot: noai"})],
        "/flaky.jpg": [(429, {"Retry-After": "0"}, b""), ok(jpeg(5))],
        "/down.jpg": [(500, {}, b"oops")],
        "/big.jpg": [ok(big)],
        "/big-nolength.jpg": [ok(big, **{"X-Test-No-Length": "1"})],
        "/redirect.jpg": [(302, {"Location": "/ok.jpg"}, b"")],
        "/to-file.jpg": [(302, {"Location": "file:///etc/passwd"}, b"")],
        "/loop.jpg": [(302, {"Location": "/loop.jpg"}, b"")],
        "/empty.jpg": [ok(b"")],
    }
    cfg = FetchConfig(**{**FAST.model_dump(), "max_bytes": len(big) - 1, "max_redirects": 3})
    with LoopbackServer(routes) as server, Fetcher(cfg, ["http"], allow_private_networks=True) as fetcher:
        names = list(routes) + ["/missing.jpg"]
        results = dict(zip(names, fetcher.fetch_many([server.url(p) for p in names]), strict=True))
        seen = server.paths_requested()
        user_agents = {h["user-agent"] for _, h in server.requests}

    assert results["/ok.jpg"].status == SUCCESS and results["/ok.jpg"].data == jpeg(1)
    assert results["/noai.jpg"].status == OPT_OUT and results["/noai.jpg"].data is None
    assert results["/scoped.jpg"].status == OPT_OUT
    assert results["/otherbot.jpg"].status == SUCCESS
    assert results["/flaky.jpg"].status == SUCCESS and results["/flaky.jpg"].attempts == 2
    assert results["/down.jpg"].status == FAILED and results["/down.jpg"].http_status == 500
    assert seen.count("/down.jpg") == 3  # 1 + retries=2, then it stops
    assert results["/missing.jpg"].status == FAILED and results["/missing.jpg"].error == "HTTP 404"
    assert seen.count("/missing.jpg") == 1  # a 404 is not retried
    assert results["/big.jpg"].status == TOO_LARGE and "Content-Length" in str(results["/big.jpg"].error)
    assert results["/big-nolength.jpg"].status == TOO_LARGE  # streamed and aborted past the cap
    assert results["/redirect.jpg"].status == SUCCESS and results["/redirect.jpg"].data == jpeg(1)
    assert results["/to-file.jpg"].status == FAILED and "not allowed" in str(results["/to-file.jpg"].error)
    assert results["/loop.jpg"].status == FAILED and "redirects" in str(results["/loop.jpg"].error)
    assert seen.count("/loop.jpg") == 4  # max_redirects=3 hops after the first request
    assert results["/empty.jpg"].status == FAILED
    assert len(user_agents) == 1 and next(iter(user_agents)).startswith("vila2-curate/")
    assert results["/noai.jpg"].meta() == {"status": "opt_out", "http_status": 200, "error_message": "X-Robots-Tag: noai"}


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_private_addresses_refused_before_any_connection(host: str) -> None:
    with LoopbackServer({"/ok.jpg": [ok(jpeg(1))]}) as server:
        url = server.url("/ok.jpg").replace("127.0.0.1", host)
        with Fetcher(FAST, ["http", "https"], allow_private_networks=False) as fetcher:
            result = fetcher.fetch(url)
        assert result.status == REFUSED and result.attempts == 1
        assert server.requests == []  # no connection was made, not even a refused-after-connect


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                                 "https://localhost:9/x.jpg", "http://[::ffff:127.0.0.1]:9/x.jpg",
                                 "http://0.0.0.0:9/x.jpg", "http://10.0.0.1/x.jpg", "http://2130706433/x.jpg",
                                 "http://0x7f.0.0.1/x.jpg", "http://127.1/x.jpg", "http://user:pw@127.0.0.1/x.jpg"])
def test_metadata_and_private_urls_are_refused(url: str) -> None:
    with Fetcher(FAST, ["http", "https"], allow_private_networks=False) as fetcher:
        result = fetcher.fetch(url)
    assert result.status == REFUSED and "non-public" in str(result.error)


def write_url_parquet(path: Path, urls: list[str | None]) -> None:
    table = pa.table({"id": list(range(len(urls))), "url": urls,
                      "text": [f"caption {i}" for i in range(len(urls))],
                      "clip_similarity_vitb32": [0.3] * len(urls)})
    pq.write_table(table, path, row_group_size=4)


@pytest.mark.parametrize("window", [{}, {"prefetch_rows": 2}, {"prefetch_bytes": 1}])
def test_url_only_parquet_reader_order_status_and_accounting(tmp_path: Path, window: dict) -> None:
    """Also with a window of 2 rows, and with a 1-byte budget (the reader waits on every head row)."""
    routes = {f"/{i}.jpg": [ok(jpeg(i))] for i in range(12)}
    routes["/3.jpg"] = [ok(jpeg(3), **{"X-Robots-Tag": "noimageindex"})]
    routes["/5.jpg"] = [(503, {}, b"")]
    del routes["/7.jpg"]  # 404
    with LoopbackServer(routes) as server:
        urls: list[str | None] = [server.url(f"/{i}.jpg") for i in range(12)]
        urls[8] = "file:///etc/passwd"
        urls[9] = None
        urls[10] = "ftp://127.0.0.1/x.jpg"
        write_url_parquet(tmp_path / "part-0.parquet", urls)
        src = SourceConfig(name="coyo", kind="coyo_parquet", paths=[str(tmp_path / "part-0.parquet")],
                           image_path_column="url", fetch_remote=True, allow_private_networks=True,
                           fetch=FAST.model_copy(update=window))
        reader = make_reader(src)
        rows = [r for shard in reader.list_shards() for t in reader.read(shard, batch_size=3) for r in t.to_pylist()]
    assert [r["key"] for r in rows] == [str(i) for i in range(12)]  # file order, whatever finished first
    by = {int(r["key"]): r for r in rows}
    kept = [i for i, r in by.items() if r["drop_reason"] is None]
    assert kept == [0, 1, 2, 4, 6, 11]
    assert all(by[i]["image"] == jpeg(i) and by[i]["image_format"] == "jpg" for i in kept)
    assert json.loads(by[0]["meta"])["fetch"] == {"status": "success", "http_status": 200}
    assert (by[3]["drop_reason"], by[3]["quarantined"], by[3]["image"]) == ("opt_out", False, None)
    assert by[5]["drop_reason"] == "failed_to_download" and not by[5]["quarantined"]
    assert json.loads(by[5]["meta"])["fetch"]["error_message"] == "HTTP 503"
    assert by[7]["drop_reason"] == "failed_to_download"
    assert by[8]["drop_reason"] == "image_path_unsafe" and by[8]["quarantined"] and by[8]["image"] is None
    assert by[9]["drop_reason"] == "image_path_missing"
    assert by[10]["drop_reason"] == "image_path_unsafe"
    dropped = [i for i, r in by.items() if r["drop_reason"] and not r["quarantined"]]
    quarantined = [i for i, r in by.items() if r["quarantined"]]
    assert len(kept) + len(dropped) + len(quarantined) == 12


def test_url_refs_without_fetch_remote_are_never_fetched(tmp_path: Path) -> None:
    with LoopbackServer({"/0.jpg": [ok(jpeg(0))]}) as server:
        write_url_parquet(tmp_path / "p.parquet", [server.url("/0.jpg"), "http://169.254.169.254/latest/meta-data/"])
        reader = make_reader(SourceConfig(name="coyo", kind="coyo_parquet", paths=[str(tmp_path / "p.parquet")],
                                          image_path_column="url"))
        rows = [r for t in reader.read(reader.list_shards()[0], 8) for r in t.to_pylist()]
        assert [r["drop_reason"] for r in rows] == ["image_path_unsafe"] * 2
        assert "fetch_remote" in json.loads(rows[0]["meta"])["unsafe_ref"]
        assert server.requests == []


def test_private_network_refused_in_a_run_is_quarantined_and_counted(tmp_path: Path) -> None:
    """A whole local run over a URL-only parquet: refused rows are quarantined with a reason, the server
    sees nothing, stats balance."""
    with LoopbackServer({"/0.jpg": [ok(jpeg(0))]}) as server:
        (tmp_path / "coyo").mkdir()
        write_url_parquet(tmp_path / "coyo" / "part-0.parquet", [server.url("/0.jpg"), server.url("/1.jpg")])
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"sources: [{{name: c, kind: coyo_parquet, paths: ['{tmp_path}/coyo/*.parquet'], "
                       f"image_path_column: url, fetch_remote: true}}]\noutput: {{path: '{tmp_path}/out'}}\n")
        stats = run_local(load_config(cfg), progress=False)
        assert server.requests == []
    assert stats["balanced"] and stats["total"]["quarantined"] == 2
    assert stats["total"]["reasons"] == {"read:url_refused_private_network": 2}


def test_url_only_run_with_fetch_accounts_every_row(tmp_path: Path) -> None:
    routes = {f"/{i}.jpg": [ok(jpeg(i))] for i in range(6)}
    routes["/1.jpg"] = [ok(jpeg(1), **{"X-Robots-Tag": "noai"})]
    routes["/2.jpg"] = [(500, {}, b"")]
    with LoopbackServer(routes) as server:
        (tmp_path / "coyo").mkdir()
        write_url_parquet(tmp_path / "coyo" / "part-0.parquet", [server.url(f"/{i}.jpg") for i in range(7)])
        cfg = tmp_path / "run.yaml"
        cfg.write_text(
            f"sources: [{{name: c, kind: coyo_parquet, paths: ['{tmp_path}/coyo/*.parquet'], image_path_column: url,"
            " fetch_remote: true, allow_private_networks: true, fetch: {retries: 1, backoff_s: 0.01}}]\n"
            f"stages: [{{type: normalize, min_side: 100}}]\noutput: {{path: '{tmp_path}/out'}}\n")
        stats = run_local(load_config(cfg), progress=False)
        again = run_local(load_config(cfg), progress=False)  # resume: finished shard, nothing refetched
        n_requests = len(server.requests)
    total = stats["total"]
    assert stats["balanced"] and total["rows_in"] == 7
    assert total["kept"] == 4 and total["dropped"] == 3 and total["quarantined"] == 0
    assert total["reasons"] == {"read:opt_out": 1, "read:failed_to_download": 2}
    assert again["total"] == total
    assert n_requests == 7 + 1  # one retry of the 500; the rerun fetched nothing


def test_http_image_root_and_mmc4_http_image_dir(tmp_path: Path) -> None:
    """A configured http(s) root: relative references become URLs under it, fetched through the guard."""
    routes = {"/imgs/a.jpg": [ok(jpeg(1))], "/imgs/sub/b.jpg": [ok(jpeg(2), **{"X-Robots-Tag": "noai"})]}
    with LoopbackServer(routes) as server:
        write_url_parquet(tmp_path / "p.parquet", ["a.jpg", "sub/b.jpg", "../etc/passwd", "missing.jpg"])
        common = {"fetch_remote": True, "allow_private_networks": True, "fetch": FAST}
        reader = make_reader(SourceConfig(name="c", kind="coyo_parquet", paths=[str(tmp_path / "p.parquet")],
                                          url_column="id", image_path_column="url",
                                          image_root=server.url("/imgs"), **common))
        rows = [r for t in reader.read(reader.list_shards()[0], 8) for r in t.to_pylist()]
        assert rows[0]["image"] == jpeg(1)
        assert [r["drop_reason"] for r in rows] == [None, "opt_out", "image_path_unsafe", "failed_to_download"]

        doc = {"url": "https://d/0", "text_list": ["s"], "image_info": [
            {"image_name": "a.jpg", "matched_text_index": 0}, {"image_name": "gone.jpg", "matched_text_index": 0}]}
        (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
        mm = make_reader(SourceConfig(name="m", kind="mmc4", paths=[str(tmp_path / "docs.jsonl")],
                                      image_dir=server.url("/imgs"), **common))
        docs = [r for t in mm.read(mm.list_shards()[0], 8) for r in t.to_pylist()]
        assert docs[0]["image_info"][0]["image"] == jpeg(1)
        assert docs[0]["image_info"][1]["drop_reason"] == "image_missing"  # a 404 under the root: not there
    off = make_reader(SourceConfig(name="c", kind="coyo_parquet", paths=[str(tmp_path / "p.parquet")],
                                   image_path_column="url", image_root="https://img.example/x"))
    with pytest.raises(SourceFormatError, match="fetch_remote"):
        next(off.read(off.list_shards()[0], 8))

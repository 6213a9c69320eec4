"""URL fetching: our COYO reader with ``fetch_remote`` vs img2dataset itself, same server, same threads.

A threaded HTTP/1.1 server on 127.0.0.1 (in its own process, so neither client shares its GIL) serves N
small JPEGs; every 10th carries ``X-Robots-Tag: noai``, every 20th answers 404 and another 20th 500.
Both clients get the same URL-only parquet, the same thread count, no retries (img2dataset's default),
and one process. Printed: images/s (URLs processed per second, img2dataset's own measure) of each, and
ratio = ours / img2dataset (target >= 1.0), against img2dataset's end-to-end wall time (process start
included) and against its own in-process shard ``duration`` (the stricter comparison). Our client keeps
connections alive and img2dataset (urllib) opens one per image; ``--no-keepalive`` makes the server close
every connection, so both pay a connect per image, as with a real URL list spread over many hosts.

img2dataset pins (opencv, albumentations, old pyarrow ranges) clash with Beam's, so it lives in a venv
of its own and runs as a subprocess; it is never imported here. Create it once with:

    python3.11 -m venv /tmp/i2d-venv && /tmp/i2d-venv/bin/pip install img2dataset==1.47.0

(or point ``--img2dataset`` / ``I2D_BIN`` at another ``img2dataset`` executable). Without it, only our
side is measured and a line says why.

    .venv/bin/python benchmarks/bench_fetch.py [--n 5000] [--threads 16] [--no-keepalive]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from _common import photo_like_jpegs, report

from vila2_curate.pipelines.io.readers import make_reader
from vila2_curate.schemas.config import FetchConfig, SourceConfig


def _serve(n: int, port_q: mp.Queue, stop: mp.Event, keepalive: bool = True) -> None:  # type: ignore[type-arg]
    """Child process: serve /<i>.jpg for i < n with the planted failures and opt-outs."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    images = photo_like_jpegs(16, size=(320, 240), seed=1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            # like production servers: no Nagle delay between the header and body writes, else every
            # keep-alive response waits for the client's delayed ACK (~40 ms) and keep-alive is punished
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:  # noqa: N802
            try:
                i = int(self.path.strip("/").split(".")[0])
            except ValueError:
                i = -1
            if not 0 <= i < n or i % 20 == 7:
                status, body, extra = 404, b"not found", {}
            elif i % 20 == 13:
                status, body, extra = 500, b"error", {}
            else:
                status, body = 200, images[i % len(images)]
                extra = {"X-Robots-Tag": "noai"} if i % 10 == 3 else {}
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra.items():
                self.send_header(k, v)
            if not keepalive:  # a new connection per image, as when every URL is on another host
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client closing its idle keep-alive connections at the end is not an error

    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.request_queue_size = 256
    port_q.put(httpd.server_address[1])
    import threading

    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    stop.wait(timeout=1800)  # bounded: the server never outlives a stuck benchmark by long
    httpd.shutdown()


def run_ours(parquet: Path, threads: int) -> tuple[float, dict[str, int]]:
    src = SourceConfig(name="bench", kind="coyo_parquet", paths=[str(parquet)], image_path_column="url",
                       fetch_remote=True, allow_private_networks=True,
                       fetch=FetchConfig(threads=threads, retries=0))
    reader = make_reader(src)
    counts: dict[str, int] = {}
    t = time.perf_counter()
    for shard in reader.list_shards():
        for table in reader.read(shard, batch_size=256):
            for reason in table.column("drop_reason").to_pylist():
                counts[reason or "success"] = counts.get(reason or "success", 0) + 1
    return time.perf_counter() - t, counts


def run_img2dataset(binary: str, parquet: Path, out: Path, threads: int) -> tuple[float, float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [binary, f"--url_list={parquet}", "--input_format=parquet", "--url_col=url",
           "--output_format=files", f"--output_folder={out}", "--processes_count=1",
           f"--thread_count={threads}", "--resize_mode=no", "--disable_all_reencoding=True",
           "--extract_exif=False", "--compute_hash=None", "--retries=0", "--timeout=10",
           "--number_sample_per_shard=100000", "--user_agent_token=img2dataset"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}): {proc.stderr[-2000:]}")
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    duration = sum(s["duration"] for s in stats)
    return wall, duration, {"successes": sum(s["successes"] for s in stats),
                            "failed_to_download": sum(s["failed_to_download"] for s in stats),
                            "count": sum(s["count"] for s in stats)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)  # more than fetch.prefetch_rows (4096)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-keepalive", action="store_true",
                    help="the server closes every connection (no reuse: the many-hosts case of real URL lists)")
    ap.add_argument("--img2dataset", default=os.environ.get("I2D_BIN", "/tmp/i2d-venv/bin/img2dataset"))
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.n, port_q, stop, not args.no_keepalive), daemon=True)
    server.start()
    try:
        port = port_q.get(timeout=60)
        work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
        parquet = work / "urls.parquet"
        urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(args.n)]
        pq.write_table(pa.table({"id": list(range(args.n)), "url": urls, "text": [f"c{i}" for i in range(args.n)]}),
                       parquet)
        run_ours(parquet, args.threads)  # warm-up: imports, first connections
        ours = [run_ours(parquet, args.threads) for _ in range(args.repeats)]
        ours_s, counts = min(ours, key=lambda x: x[0])
        ours_rate = args.n / ours_s
        fields: dict[str, object] = {"urls": args.n, "threads": args.threads, "keepalive": not args.no_keepalive,
                                     "ours_s": round(ours_s, 3),
                                     "ours_images_per_s": round(ours_rate, 1), "ours_statuses": counts}
        if not Path(args.img2dataset).exists():
            report("fetch", **fields, img2dataset="skipped: no img2dataset at "
                   f"{args.img2dataset} (python3.11 -m venv /tmp/i2d-venv && "
                   "/tmp/i2d-venv/bin/pip install img2dataset==1.47.0)")
            return
        runs = [run_img2dataset(args.img2dataset, parquet, work / "i2d", args.threads) for _ in range(args.repeats)]
        wall, duration, i2d = min(runs, key=lambda x: x[1])
        report("fetch", **fields,
               img2dataset_wall_s=round(wall, 3), img2dataset_duration_s=round(duration, 3),
               img2dataset_images_per_s_wall=round(args.n / wall, 1),
               img2dataset_images_per_s_duration=round(args.n / duration, 1), img2dataset_counts=i2d,
               ratio_vs_wall=round(wall / ours_s, 2), ratio_vs_duration=round(duration / ours_s, 2),
               target=">= 1.0")
        shutil.rmtree(work, ignore_errors=True)
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.kill()


if __name__ == "__main__":
    main()

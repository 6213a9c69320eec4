"""OpenAI-compatible client: requests in flight across batch boundaries vs draining at every batch end.

A loopback chat.completions server answers every request after a fixed latency (what a busy SGLang /
vLLM server looks like from the client). The same stream of batches (each decoded from JPEG first, as
the recaption stage does) goes through, at the same ``max_concurrency``:

- before: the client as it was, one batch at a time (decode, submit all, wait for all): at each batch
  end the last requests run with the other slots empty, then nothing is in flight while the next batch
  decodes;
- after: ``OpenAICaptioner.generate_batches``, which reads and queues batch k+1 before waiting for batch k.

Printed: images/s of each, their ratio, mean requests in flight, the share of time with none in flight,
and the in-flight count over time (server side, per 25 ms).

    python benchmarks/bench_openai_client.py [--batches 8] [--batch-size 100] [--concurrency 16]
                                             [--latency-ms 200]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from _common import photo_like_jpegs, report

from vila2_curate.recaption.backends.openai_client import OpenAICaptioner
from vila2_curate.recaption.runtime import load_image
from vila2_curate.schemas.config import CaptionerConfig, GenerationParams


class LatencyServer:
    """chat.completions on 127.0.0.1 answering after ``latency_s``; records each request's (start, end).
    Bounded: past ``max_requests`` it answers 503 (the client then fails instead of running forever)."""

    def __init__(self, latency_s: float, max_requests: int) -> None:
        self.latency_s, self.max_requests = latency_s, max_requests
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                start = time.perf_counter()
                self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    over = len(server.spans) >= server.max_requests
                time.sleep(0 if over else server.latency_s)
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A photo."},
                                        "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
                data = json.dumps(payload).encode()
                self.send_response(503 if over else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with server.lock:
                    server.spans.append((start, time.perf_counter()))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inflight(self, t0: float, t1: float, step: float = 0.025) -> list[float]:
        """Mean requests in flight per ``step`` seconds over [t0, t1]."""
        with self.lock:
            spans = [(max(a, t0), min(b, t1)) for a, b in self.spans if b > t0 and a < t1]
        out = []
        t = t0
        while t < t1:
            u = min(t + step, t1)
            out.append(round(sum(max(0.0, min(b, u) - max(a, t)) for a, b in spans) / (u - t), 2))
            t = u
        return out


def legacy_generate(client: OpenAICaptioner, images: list[Any], prompts: list[str], ids: list[str]
                    ) -> list[Any]:
    """The client's ``generate`` before ``generate_batches``: submit the batch, wait for all of it."""
    client.load()
    futures = [client._pool.submit(client._caption_one, im, p, k)
               for im, p, k in zip(images, prompts, ids, strict=True)]
    return [f.result() for f in futures]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--image-size", default="320x240")
    ap.add_argument("--max-side", type=int, default=256)
    args = ap.parse_args()
    w, h = map(int, args.image_size.split("x"))
    n = args.batches * args.batch_size
    jpegs = photo_like_jpegs(n, (w, h))
    batches = [jpegs[s : s + args.batch_size] for s in range(0, n, args.batch_size)]
    server = LatencyServer(args.latency_ms / 1000, max_requests=4 * n + args.batch_size + 64)  # 4 runs + 1
    cfg = CaptionerConfig(backend="openai", model="bench", base_url=server.url,
                          max_concurrency=args.concurrency, image_max_side=args.max_side,
                          generation=GenerationParams(max_new_tokens=16))
    client = OpenAICaptioner(cfg)
    prompts = ["Describe the image."] * args.batch_size

    def decoded() -> Iterator[tuple[list[Any], list[str], list[str]]]:
        for k, batch in enumerate(batches):  # the stage decodes a batch before handing it over
            yield [load_image(b, args.max_side) for b in batch], prompts[: len(batch)], \
                [f"b{k}-{i}" for i in range(len(batch))]

    def before() -> int:
        return sum(len(legacy_generate(client, *b)) for b in decoded())

    def after() -> int:
        return sum(len(r) for r in client.generate_batches(decoded()))

    try:
        legacy_generate(client, *next(decoded()))  # warm-up: connections, threads
        runs = {}
        for name, fn in (("before", before), ("after", after), ("before2", before), ("after2", after)):
            t0 = time.perf_counter()
            assert fn() == n
            t1 = time.perf_counter()
            line = server.inflight(t0, t1)
            key = name.rstrip("2")
            if key not in runs or t1 - t0 < runs[key]["seconds"]:
                runs[key] = {"seconds": t1 - t0, "timeline": line}
    finally:
        client.close()
        server.close()

    def stats(r: dict[str, Any]) -> dict[str, Any]:
        line = r["timeline"]
        return {"images_per_s": round(n / r["seconds"], 1), "mean_inflight": round(sum(line) / len(line), 2),
                "share_of_time_none_inflight": round(sum(v < 0.05 for v in line) / len(line), 3)}

    report("openai_client_inflight", requests=n, batches=args.batches, batch_size=args.batch_size,
           concurrency=args.concurrency, latency_ms=args.latency_ms,
           ideal_images_per_s=round(args.concurrency / (args.latency_ms / 1000), 1),
           before=stats(runs["before"]), after=stats(runs["after"]),
           ratio_after_vs_before=round(runs["before"]["seconds"] / runs["after"]["seconds"], 2),
           inflight_per_25ms_before=runs["before"]["timeline"][:160],
           inflight_per_25ms_after=runs["after"]["timeline"][:160])


if __name__ == "__main__":
    main()

"""Throughput mechanics of the captioner backends and model stages, on CPU: requests in flight across
batch boundaries (OpenAI-compatible client), batches cut by memory after sorting by prompt length
(transformers backend), and CPU work prepared ahead of the model (prefetch helper, grounding)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers.loopback_http import ThreadedEndpoint
from vila2_curate.recaption.backends import CaptionerUnavailable
from vila2_curate.recaption.backends.batching import SampleCost, length_batches, sample_cost
from vila2_curate.recaption.backends.openai_client import OpenAICaptioner
from vila2_curate.recaption.backends.prefetch import ahead
from vila2_curate.schemas.config import CaptionerConfig, GenerationParams, ModelRuntime


class _ChatServer(ThreadedEndpoint):
    """chat.completions on 127.0.0.1: answers after ``delay_s`` (404 for the prompt "missing"), records
    each request's prompt with its start and end time; at most ``max_requests`` are answered."""

    def __init__(self, delay_s: float, max_requests: int = 200) -> None:
        self.delay_s, self.max_requests = delay_s, max_requests
        self.spans: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                start = time.perf_counter()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"][-1]["text"]
                with server.lock:
                    over = len(server.spans) >= server.max_requests
                status = 503 if over else 404 if prompt == "missing" else 200
                time.sleep(server.delay_s if status == 200 else 0)
                choice = {"message": {"content": f"re: {prompt}"}, "finish_reason": "stop"}
                data = json.dumps({"choices": [choice], "usage": {"completion_tokens": 2}}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with server.lock:
                    server.spans.append((prompt, start, time.perf_counter()))

        self.serve(Handler)


def _client(url: str, concurrency: int) -> OpenAICaptioner:
    cfg = CaptionerConfig(backend="openai", model="m", base_url=url, max_concurrency=concurrency,
                          max_retries=0, timeout_s=5.0, generation=GenerationParams(max_new_tokens=4))
    return OpenAICaptioner(cfg, backoff_base_s=0.01, backoff_max_s=0.02)


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (16, 12), (i, 2 * i, 3 * i)) for i in range(n)]


def test_openai_requests_stay_in_flight_across_batch_boundaries() -> None:
    srv = _ChatServer(delay_s=0.15)
    client = _client(srv.url, concurrency=4)
    try:
        batches = [(_images(6), [f"{x}{i}" for i in range(6)], None) for x in "ab"]
        results = list(client.generate_batches(batches))
        assert [[r.text for r in rs] for rs in results] == [[f"re: a{i}" for i in range(6)],
                                                            [f"re: b{i}" for i in range(6)]]
        spans = srv.spans
        last_a_end = max(end for p, _, end in spans if p.startswith("a"))
        first_b_start = min(start for p, start, _ in spans if p.startswith("b"))
        assert first_b_start < last_a_end - 0.05  # batch b took the slots batch a's tail left free
        events = sorted([(s, 1) for _, s, _ in spans] + [(e, -1) for _, _, e in spans])
        inflight = peak = 0
        for _, step in events:
            inflight += step
            peak = max(peak, inflight)
        assert peak <= 4  # max_concurrency still bounds it
        # one batch at a time drains: batch b starts only after all of batch a has finished
        srv.spans.clear()
        for images, prompts, ids in batches:
            client.generate(images, prompts, ids)
        last_a_end = max(end for p, _, end in srv.spans if p.startswith("a"))
        assert min(start for p, start, _ in srv.spans if p.startswith("b")) >= last_a_end - 0.01
    finally:
        client.close()
        srv.close()


def test_openai_outage_in_a_batch_cancels_the_queued_batch() -> None:
    srv = _ChatServer(delay_s=0.05)
    client = _client(srv.url, concurrency=1)
    try:
        batches = [(_images(2), ["ok", "missing"], None), (_images(5), [f"b{i}" for i in range(5)], None)]
        stream = client.generate_batches(batches)
        with pytest.raises(CaptionerUnavailable, match="http 404"):
            next(stream)
        time.sleep(0.3)
        assert sum(p.startswith("b") for p, _, _ in srv.spans) <= 1  # the queued batch was cancelled
    finally:
        client.close()
        srv.close()


def test_length_batches_cut_by_memory_after_sorting_by_length() -> None:
    cost = SampleCost(kv_per_token=100, act_per_token=10, attn_per_token2=0, logits=0)
    lengths = [50, 10, 400, 10, 400, 50, 10, 400]
    groups = [True] * len(lengths)
    by_count = length_batches(lengths, groups, cap=3, budget=None, cost=cost, new_tokens=10)
    assert by_count == [[1, 3, 6], [0, 5, 2], [4, 7]]  # sorted by length, cut at 3
    budget = 3 * cost.bytes(50, 10)  # three short ones fit, one long one alone
    by_memory = length_batches(lengths, groups, cap=8, budget=budget, cost=cost, new_tokens=10)
    assert by_memory == [[1, 3, 6], [0, 5], [2], [4], [7]]
    assert all(len(b) * cost.bytes(max(lengths[i] for i in b), 10) <= budget or len(b) == 1
               for b in by_memory)
    assert length_batches(lengths, groups, 8, budget, cost, 10) == by_memory  # deterministic
    mixed = length_batches([5, 5, 5], [True, False, True], cap=8, budget=None, cost=cost, new_tokens=0)
    assert mixed == [[1], [0, 2]]  # text-only and image prompts never share a batch


def test_sample_cost_of_a_full_size_recaptioner() -> None:
    from vila2_curate.pipelines.demo.vlm import _train_tokenizer, vlm_config

    cost = sample_cost(vlm_config("llava-1.5-7b", _train_tokenizer()), 2)
    assert cost.kv_per_token == 2 * 32 * 32 * 128 * 2  # Llama-2-7B: 512 KiB of K and V per token in bf16
    per_sample = cost.bytes(600, 128)  # 576 image tokens + the prompt, 128 new tokens
    assert 350 << 20 < per_sample < 600 << 20


def test_transformers_backend_batches_by_memory(tmp_path: Path) -> None:
    from vila2_curate.pipelines.demo.vlm import build_demo_vlm
    from vila2_curate.recaption.backends.transformers_vlm import TransformersCaptioner

    folder = build_demo_vlm(tmp_path / "vlm", seed=0)
    cfg = CaptionerConfig(model=str(folder), runtime=ModelRuntime(batch_size=8),
                          generation=GenerationParams(max_new_tokens=4))
    cap = TransformersCaptioner(cfg)
    cap.load()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(6)]
    prompts = ["Describe.", "Describe the image in detail, every object, its colour and its place."] * 3
    unbounded = cap.generate(images, prompts)
    lengths = [cap._length(p, im) for p, im in zip(prompts, images, strict=True)]
    assert cap.memory_budget is None and len(cap._batches(lengths, [True] * 6, 4)) == 1  # CPU: count cap
    cap.memory_budget = 3 * cap._cost.bytes(min(lengths), 4)  # room for three short prompts
    chunks = cap._batches(lengths, [True] * 6, 4)
    assert [len(c) for c in chunks] == [3, 1, 1, 1] or [len(c) for c in chunks] == [3, 2, 1]
    assert all(lengths[i] == min(lengths) for i in chunks[0])  # short prompts together, first
    assert cap.generate(images, prompts) == unbounded  # a sample's caption does not depend on its batch
    cap.close()


def test_ahead_keeps_order_bounds_work_and_cancels() -> None:
    from concurrent.futures import ThreadPoolExecutor

    started: list[int] = []

    def prepare(i: int) -> int:
        started.append(i)
        return i * i

    with ThreadPoolExecutor(max_workers=2) as pool:
        got = [(i, f.result()) for i, f in ahead(range(6), prepare, pool, depth=2)]
        assert got == [(i, i * i) for i in range(6)]
        started.clear()
        stream = ahead(range(100), prepare, pool, depth=2)
        next(stream)
        time.sleep(0.05)
        assert len(started) <= 4  # the current item and at most ``depth`` ahead were ever submitted
        stream.close()


def test_grounding_prepares_ahead_and_isolates_bad_images(tmp_path: Path) -> None:
    import io

    from vila2_curate.pipelines.demo.detector import build_demo_detector
    from vila2_curate.schemas.config import GroundingConfig
    from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table
    from vila2_curate.specialists.grounding import GroundingStage

    folder = build_demo_detector(tmp_path / "owl", seed=0)
    rows = []
    for i in range(7):
        buf = io.BytesIO()
        Image.new("RGB", (80 + 8 * i, 60), (40 * i, 90, 200)).save(buf, format="PNG")
        data = b"not an image" if i == 3 else buf.getvalue()
        rows.append({"key": f"k{i}", "source": "s", "shard": "0", "image": data,
                     "text": "a red ellipse next to a blue triangle"})
    table = make_table(rows, PAIR_SCHEMA)
    outs = []
    for cpus, bs in ((1, 1), (3, 2)):
        rt = ModelRuntime(batch_size=bs, cpus=cpus)
        stage = GroundingStage(GroundingConfig(model=str(folder), box_threshold=0.0, runtime=rt))
        outs.append(stage(table))
    stage._detector.images_on_device = True  # what a GPU gets: the image processor after the threads
    assert stage(table).column("specialists").to_pylist() == outs[-1].column("specialists").to_pylist()
    for out in outs:
        reasons = out.column("drop_reason").to_pylist()
        assert reasons[3] is not None and [r is None for i, r in enumerate(reasons) if i != 3] == [True] * 6
    one, many = ([(s or {}).get("grounding") for s in o.column("specialists").to_pylist()] for o in outs)
    assert [a is None for a in one] == [i == 3 for i in range(7)]
    for a, b in zip(one, many, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert [d["label"] for d in a] == [d["label"] for d in b]
            assert np.allclose([d["box"] for d in a], [d["box"] for d in b], atol=1e-4)

"""Captioner over an OpenAI-compatible ``/chat/completions`` endpoint (SGLang, vLLM serving NVILA/Qwen2-VL).

Plain ``httpx`` rather than the ``openai`` SDK: httpx is already installed with transformers (via
huggingface_hub), whereas the SDK is an extra dependency whose own hidden retries and timeouts would
compete with ours; we need exact control of which failures are retried, which quarantine one sample and
which fail the batch.

- Each image goes inline as a base64 ``data:`` URL (JPEG, after the same ``image_max_side`` downscale
  the in-process backend applies), followed by the prompt text, in one user message.
- At most ``max_concurrency`` requests are in flight (a thread pool of that size sharing one connection
  pool); the server batches them (continuous batching), so no client-side batching is needed.
  ``generate_batches`` takes a stream of batches and queues the next batch while the current one's last
  requests run, so the server does not drain to zero at every batch end (``generate`` is one batch).
- 429, 5xx, timeouts and connection errors are retried ``max_retries`` times with exponential backoff and
  full jitter (``Retry-After`` honoured, capped); when retries run out the backend raises
  :class:`CaptionerUnavailable` so the engine fails the batch (resumable) instead of quarantining every
  row of an outage. 400/413/422 (the server rejected *this* request, e.g. an image it cannot read) fail
  that sample only. 401/403/404 are configuration errors and raise at once.
- ``finish_reason == "length"`` -> ``hit_max_tokens``; ``usage.completion_tokens`` -> token count.
- Greedy by default (temperature 0); a per-request ``seed`` (supported by vLLM and SGLang) derived from
  the configured seed and the sample id keeps sampling reproducible.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from vila2_curate.recaption.backends.base import CaptionerUnavailable, CaptionResult
from vila2_curate.recaption.runtime import derive_seed, reason_detail
from vila2_curate.schemas.config import CaptionerConfig

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
SAMPLE_STATUS = frozenset({400, 413, 422})  # the request itself was refused: this sample only


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _SampleError(Exception):
    pass


def image_data_url(image: Any, quality: int = 95) -> str:
    """A PIL image as a ``data:image/jpeg;base64,...`` URL."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAICaptioner:
    """Caption images through an OpenAI-compatible server; thread-safe, bounded concurrency."""

    def __init__(
        self, cfg: CaptionerConfig, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0
    ) -> None:
        if not cfg.base_url:
            raise ValueError(
                "captioner.base_url is required for the openai backend (e.g. http://host:30000/v1)"
            )
        self.cfg = cfg
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.identity = {"backend": "openai", "model": cfg.model, "base_url": cfg.base_url, "demo": False}
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0}

    def load(self) -> None:
        if self._client is not None:
            return
        import httpx

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        n = max(1, self.cfg.max_concurrency)
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.cfg.timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="openai-captioner")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
        self._client, self._pool = None, None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    # -- requests --------------------------------------------------------------------------------------
    def request_body(self, image: Any, prompt: str, sample_id: str) -> dict[str, Any]:
        g = self.cfg.generation
        content: list[dict[str, Any]] = []
        if image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
        content.append({"type": "text", "text": prompt})
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": g.max_new_tokens,
            "temperature": g.temperature if g.do_sample else 0.0,
            "top_p": g.top_p if g.do_sample else 1.0,
            "n": 1,
            "seed": derive_seed(g.seed, sample_id) % 2**31,
        }
        if g.repetition_penalty != 1.0:
            body["repetition_penalty"] = g.repetition_penalty  # vLLM / SGLang extension
        return body

    def _post_once(self, body: dict[str, Any]) -> CaptionResult:
        import httpx

        with self._lock:
            self.stats["requests"] += 1
        try:
            resp = self._client.post(self.url, json=body)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        status = resp.status_code
        if status in RETRY_STATUS:
            raise _Retryable(
                f"http {status}: {resp.text[:200]}", _retry_after(resp.headers.get("retry-after"))
            )
        if status in SAMPLE_STATUS:
            raise _SampleError(f"http {status}: {resp.text[:200]}")
        if status >= 400:
            raise CaptionerUnavailable(
                f"{self.url}: http {status} (check model name, base_url, api key): {resp.text[:200]}"
            )
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason")
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed response: {reason_detail(e)}") from e
        return CaptionResult(
            text=text.strip(),
            n_generated_tokens=int(usage.get("completion_tokens") or 0),
            hit_max_tokens=finish == "length",
        )

    def _caption_one(self, image: Any, prompt: str, sample_id: str) -> CaptionResult:
        body = self.request_body(image, prompt, sample_id)
        rng = random.Random(derive_seed("backoff", sample_id))
        attempt = 0
        while True:
            try:
                return self._post_once(body)
            except _SampleError as e:
                return CaptionResult(error=str(e))
            except _Retryable as e:
                if attempt >= self.cfg.max_retries:
                    raise CaptionerUnavailable(
                        f"{self.url}: giving up after {attempt + 1} attempts: {e}"
                    ) from None
                cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
                delay = rng.uniform(0, cap)  # full jitter: spread retries of many workers apart
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.backoff_max_s))
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(delay)
                attempt += 1

    def generate(
        self, images: list[Any], prompts: list[str], sample_ids: list[str] | None = None, **_: Any
    ) -> list[CaptionResult]:
        """One caption per (PIL image, prompt), in input order; at most max_concurrency requests at once."""
        stream = self.generate_batches([(images, prompts, sample_ids)])
        try:
            return next(stream)
        finally:
            stream.close()

    def generate_batches(
        self, batches: Iterable[tuple[list[Any], list[str], list[str] | None]]
    ) -> Iterator[list[CaptionResult]]:
        """Each (images, prompts, sample_ids) batch's results, in order, with max_concurrency requests in
        flight across batch boundaries: batch k+1 is read from ``batches`` (its decoding overlaps the
        requests) and queued before batch k is waited for, so its requests take the slots batch k's
        last requests free. No request outlives the iteration: a stop or an error cancels queued ones
        and waits for running ones.
        """
        self.load()
        source = iter(batches)
        pending: deque[list[Future]] = deque()

        def queue_next() -> None:
            for images, prompts, ids in source:
                ids = ids or [str(i) for i in range(len(images))]
                pending.append([self._pool.submit(self._caption_one, im, p, k)
                                for im, p, k in zip(images, prompts, ids, strict=True)])
                return

        try:
            queue_next()
            while pending:
                if len(pending) < 2:
                    queue_next()
                yield self._collect(pending.popleft())
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()
            wait([f for futures in pending for f in futures])

    @staticmethod
    def _collect(futures: list[Future]) -> list[CaptionResult]:
        """The batch's results; all of its requests finish before an outage is raised."""
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except CaptionerUnavailable as e:
                error = error or e
                results.append(None)
        if error is not None:
            raise error
        return results

    def log_likelihood(self, *_: Any, **__: Any) -> list[float | None]:
        raise NotImplementedError("the openai backend does not score captions; use backend: transformers")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None

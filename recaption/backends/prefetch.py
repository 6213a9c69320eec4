"""CPU work for the next batches (image decode, resize, processor) on threads while the model runs.

A GPU that waits for PIL or a processor between batches idles for that long; preparing batch k+1 while
batch k runs hides that time as long as preparing is faster than the model. Used by the transformers
captioner and the grounding stage (``specialists/`` may import ``recaption/``).
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ahead(items: Iterable[T], prepare: Callable[[T], R], pool: Executor, depth: int = 1
          ) -> Iterator[tuple[T, Future[R]]]:
    """Yield ``(item, future of prepare(item))`` in order, with ``depth`` later items already submitted
    while the caller works on the current one. Unconsumed futures are cancelled when the caller stops."""
    queue: deque[tuple[T, Future[R]]] = deque()
    source = iter(items)

    def fill() -> None:
        while len(queue) < depth + 1:
            try:
                item = next(source)
            except StopIteration:
                return
            queue.append((item, pool.submit(prepare, item)))

    fill()
    try:
        while queue:
            item, future = queue.popleft()
            fill()
            yield item, future
    finally:
        for _, future in queue:
            future.cancel()


class PerThread:
    """A deep copy of ``obj`` per thread that asks: HF processors and fast tokenizers change their own
    padding state on each call, so two threads must never share one."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._local = threading.local()

    def get(self) -> Any:
        mine = getattr(self._local, "obj", None)
        if mine is None:
            mine = self._local.obj = copy.deepcopy(self._obj)
        return mine


def pinned(batch: dict[str, Any]) -> dict[str, Any]:
    """Tensors in page-locked memory, so the host-to-GPU copy is asynchronous (no-op without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return batch
    return {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

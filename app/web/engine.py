"""The in-process inference engine behind probing and live steering.

Language models and SAEs load lazily, once per process, and are kept in small LRU caches
(``SAELAB_INFERENCE_MODELS`` / ``_SAES``). All tensor work runs on one dedicated thread:
requests queue for it instead of competing for the CPU/GPU (or its memory), and the event
loop stays free to serve pages meanwhile. Past ``MAX_WAITING`` queued requests the engine
answers "busy" (HTTP 503) rather than letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.settings import Settings

T = TypeVar("T")
MAX_WAITING = 64


class EngineBusy(RuntimeError):
    """Too many probe/steer requests are already waiting."""


class EngineInputError(ValueError):
    """The model cannot take this input (too many tokens, ...) or the SAE cannot load."""


@dataclass(frozen=True)
class SaeHandle:
    """What the engine needs of an SAE row (read from the store by the route)."""

    id: int
    path: str
    model: str
    layer: int
    n_latents: int


class _Lru(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = max(1, size)

    def get_or_load(self, key: Any, load: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = load()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class InferenceEngine:
    """Models and SAEs for the web, with a one-thread work queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models = _Lru(settings.inference_models)
        self._saes = _Lru(settings.inference_saes)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._waiting = 0

    def preload_model(self, name: str, lm: Any) -> None:
        """Register an already loaded model under ``name`` (tests, benchmarks)."""
        self._models.get_or_load(name, lambda: lm)

    # -- loading (on the engine thread) -----------------------------------------------
    def model(self, name: str):
        from training.data.models import load_model

        return self._models.get_or_load(name, lambda: load_model(
            name, data_dir=self.settings.data_dir))

    def sae(self, handle: SaeHandle):
        """(lm, sae module, layer) for an SAE row, on the model's device."""
        from training.sae.folder import load_sae

        lm = self.model(handle.model)
        sae = self._saes.get_or_load(handle.path, lambda: load_sae(Path(handle.path),
                                                                   lm.device)[0].eval())
        return lm, sae

    # -- running ---------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Raise EngineBusy when ``MAX_WAITING`` requests already wait for the engine."""
        if self._waiting >= MAX_WAITING:
            raise EngineBusy(f"the inference engine has {self._waiting} requests waiting: "
                             "try again in a moment")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread; raises EngineBusy when the queue is full."""
        self.check_capacity()
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._waiting -= 1

    async def probe(self, handle: SaeHandle, text: str):
        from training.inference.probe import probe_text

        def work():
            try:
                lm, sae = self.sae(handle)
                return probe_text(lm, sae, handle.layer, text)
            except ValueError as exc:
                raise EngineInputError(str(exc)) from exc

        return await self.run(work)

    async def steer(self, handle: SaeHandle, ids_of: Callable[[Any], list[int]],
                    steers: list, maxima: dict[int, float], sampling, top: int = 0
                    ) -> AsyncIterator[tuple]:
        """(row, text) pieces as the baseline (0) and steered (1) replies to ``ids_of(lm)``
        are decoded; (row, text, alternatives) with ``top`` most likely tokens.

        Callers check ``check_capacity()`` before they start streaming a response."""
        from training.inference.steering import STEERED_ROWS, generate_pair, steering_edit

        def produce(lm, sae):
            edit = steering_edit(sae, steers, maxima, rows=STEERED_ROWS)
            yield from generate_pair(lm, handle.layer, edit, ids_of(lm), sampling, top=top)

        async for item in self.stream(handle, produce):
            yield item

    async def complete(self, handle: SaeHandle, ids_of: Callable[[Any], list[int]],
                       steers: list, maxima: dict[int, float], sampling
                       ) -> AsyncIterator[str | dict]:
        """Text pieces of one (steered) reply to ``ids_of(lm)``, then one dict: ``usage``
        (prompt, completion and total tokens) and ``finish_reason`` (stop or length)."""
        from training.inference.sampling import decode_rows
        from training.inference.steering import steering_edit

        def produce(lm, sae):
            ids = ids_of(lm)
            edit = steering_edit(sae, steers, maxima) if steers else None
            counts = [0]
            for _, piece in decode_rows(lm, ids, 1, sampling, layer=handle.layer, edit=edit,
                                        counts=counts):
                yield piece
            yield {"usage": {"prompt_tokens": len(ids), "completion_tokens": counts[0],
                             "total_tokens": len(ids) + counts[0]},
                   "finish_reason": "length" if counts[0] >= sampling.max_tokens else "stop"}

        async for item in self.stream(handle, produce):
            yield item

    async def stream(self, handle: SaeHandle, produce: Callable[[Any, Any], Iterator[T]]
                     ) -> AsyncIterator[T]:
        """What ``produce(lm, sae)`` yields, computed on the engine thread and handed to the
        event loop piece by piece; a bad input arrives as ``EngineInputError``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            if stop.is_set():  # the client left while this waited in the queue
                return
            try:
                lm, sae = self.sae(handle)
                for piece in produce(lm, sae):
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except ValueError as exc:  # the model cannot take this input
                loop.call_soon_threadsafe(queue.put_nowait, EngineInputError(str(exc)))
            except Exception as exc:  # delivered to the stream as an error event
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        self.check_capacity()
        self._waiting += 1
        try:
            future = loop.run_in_executor(self._executor, work)
        except RuntimeError:  # the executor is shut down: the server is stopping
            self._waiting -= 1
            raise EngineBusy("the inference engine is shutting down") from None
        # however work ends (or never starts: executor shut down), the stream ends
        future.add_done_callback(lambda _: queue.put_nowait(done))
        future.add_done_callback(lambda _: self._release())
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()  # the client went away or the stream ended: free the engine

    def _release(self) -> None:
        self._waiting -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

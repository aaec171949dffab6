"""Handles of the real interpreter: tensors, events and the CPU stream stand-in."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch


class RealTensor:
    """A tensor handle; data arrives when its stream has run the producing op."""

    def __init__(self, shape: tuple[int, ...], step: int, stream: str, space: str = "native") -> None:
        self.shape = tuple(shape)
        self.step = step
        self.stream = stream
        self.space = space  # "native", "up" (after a linear up-projection), "up-nonlinear"
        self.data: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.extra: dict[str, Any] = {}

    def set(self, data: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        self.data = data
        self.shape = tuple(data.shape) if shape is None else shape
        self.ready.set()


class RealEvent:
    def __init__(self, id_: int) -> None:
        self.id = id_
        self.flag = threading.Event()
        self.cuda_event: Any = None  # torch.cuda.Event on CUDA


class StreamThread:
    """A stand-in for a CUDA stream: one worker thread, ops run in issue order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"stream-{name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            fn = self.q.get()
            if fn is None:
                return
            fn()

    def submit(self, fn: Callable[[], None]) -> None:
        self.q.put(fn)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=30)

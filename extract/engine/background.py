"""Work on a thread of its own, so that the device never waits for the host: the next items of an iteration
made ahead of their consumer (reading and tokenising batches), and calls run behind their caller (writing
rows). Both are bounded, so memory stays bounded; both are context managers whose exit stops and joins
their thread, so no thread outlives its job or keeps the process alive. A failure on the thread is raised
in the caller's thread, the same exception object (its message, its exit code).

`ahead` / `queued` of 0 does the work in the caller's thread instead, one item or call after another.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from extract.errors import StopRequested

T = TypeVar("T")
_END = object()  # the iteration is over / no more calls


class RunAhead(Generic[T]):
    """Iterate over `items`, whose making runs on a thread up to `ahead` items before the consumer."""

    def __init__(self, items: Iterable[T], ahead: int, name: str):
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=max(ahead, 1))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True) if ahead else None

    def __enter__(self) -> "RunAhead[T]":
        if self._thread is not None:
            self._thread.start()
        return self

    def __iter__(self) -> Iterator[T]:
        if self._thread is None:
            yield from self._items
            return
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item

    def _produce(self) -> None:
        try:
            for item in self._items:
                self._queue.put((item, None))
                if self._closed.is_set():
                    return
            self._queue.put((_END, None))
        except BaseException as error:  # handed to the consumer, which raises it
            self._queue.put((None, error))

    def __exit__(self, *exc) -> None:
        """Stop making items; the one being made is finished first (its put finds room: the queue is
        emptied after the stop is asked for)."""
        if self._thread is None:
            return
        self._closed.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


class RunBehind:
    """`submit(*args)` queues `call(*args)` for a thread that runs the calls in order; at most `queued`
    calls wait while one runs. After a call fails, later ones are skipped and the failure is raised by
    the next `submit`, or at exit. Exit waits for every queued call; a failure then takes the place of a
    stop request on its way (the job did not stop with everything saved), not of another error."""

    def __init__(self, call: Callable[..., None], queued: int, name: str):
        self._call = call
        self._queue: queue.Queue = queue.Queue(maxsize=max(queued, 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True) if queued else None

    def __enter__(self) -> "RunBehind":
        if self._thread is not None:
            self._thread.start()
        return self

    def submit(self, *args) -> None:
        if self._thread is None:
            self._call(*args)
            return
        self._raise_failure()
        self._queue.put(args)

    def _work(self) -> None:
        while (args := self._queue.get()) is not _END:
            if self._error is None:
                try:
                    self._call(*args)
                except BaseException as error:  # raised in the caller's thread
                    self._error = error

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._thread is None:
            return
        self._queue.put(_END)
        self._thread.join()
        if exc_type is None or issubclass(exc_type, StopRequested):
            self._raise_failure()

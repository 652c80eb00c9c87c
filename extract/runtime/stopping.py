"""Stopping on request: SIGTERM, SIGINT and SIGUSR1 end the job at the next safe point, on every rank.

Before the job touches its output (reading input, loading the model) a signal stops the process at once:
there is nothing to save. While the job owns its output, a signal only records the request, and the
engine acts on it between batches, when every row written so far is durable; an HDF5 write is never cut
short. The first rank to act on a request publishes it in the process group's key-value store; every
other rank sees it there at its next safe point or while it waits for its peers (`collectives.barrier`
polls), so no rank is left waiting in a collective for a peer that has gone.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from extract.runtime import group_store
from extract.errors import StopRequested, peers_lost

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PEER_CHECK_SECONDS = 1.0  # how often a rank asks the store whether a peer stopped
STOP_KEY = "stop"  # under this job's name (group_store.key)


@dataclass
class _State:
    requested: str | None = None  # the first signal this process received
    deferred: bool = False  # True while the job owns its output: act only at safe points
    published: bool = False
    last_peer_check: float = 0.0


_state = _State()


def _on_signal(signum: int, _frame) -> None:
    if _state.requested is None:
        _state.requested = signal.Signals(signum).name
    if not _state.deferred:
        raise_if_requested()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn STOP_SIGNALS into stop requests for the duration of one job; restore the old handlers after.

    Only the main thread may set handlers; a job run from another thread keeps its caller's handling."""
    global _state
    _state = _State()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While the job owns its output: signals are acted on only where `raise_if_requested` is called."""
    _state.deferred = True
    try:
        yield
    finally:
        _state.deferred = False


def _peer_request() -> str | None:
    """The signal a peer rank stopped for, if any; asks the store at most every PEER_CHECK_SECONDS."""
    store = group_store.store()
    if store is None or time.monotonic() - _state.last_peer_check < PEER_CHECK_SECONDS:
        return None
    _state.last_peer_check = time.monotonic()
    try:
        if store.check([group_store.key(STOP_KEY)]):
            return store.get(group_store.key(STOP_KEY)).decode()
    except RuntimeError:  # the store lives with rank 0's node or torchrun's agent
        raise peers_lost() from None
    return None


def _publish(signal_name: str) -> None:
    store = group_store.store()
    if store is None or _state.published:
        return
    _state.published = True
    with contextlib.suppress(RuntimeError):  # peers that cannot be told are stopped by torchrun instead
        store.set(group_store.key(STOP_KEY), signal_name)


def requested() -> str | None:
    """The signal this rank is to stop for (its own, or a peer's), if any."""
    return _state.requested or _peer_request()


def stop(signal_name: str) -> None:
    """Stop for `signal_name`: tell the peers, then raise StopRequested."""
    _publish(signal_name)
    raise StopRequested(signal_name)


def raise_if_requested() -> None:
    """A safe point: raise StopRequested if this process got a stop signal or a peer rank stopped."""
    signal_name = requested()
    if signal_name is not None:
        stop(signal_name)

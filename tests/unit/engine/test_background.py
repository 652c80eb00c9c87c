"""Work on threads of their own (extract/engine/background.py): made ahead of its consumer, run behind its caller,
with failures raised in the caller's thread as they were raised, and no thread left behind."""

import threading

import pytest

from extract.engine.background import RunAhead, RunBehind
from extract.errors import JobError, StopRequested, UserError

WAIT = 60  # seconds before a test that waits on another thread gives up (a hang, never a speed limit)


def test_items_are_made_ahead_on_another_thread_and_arrive_in_order():
    made_by, second_made = [], threading.Event()

    def items():
        for number in range(5):
            made_by.append(threading.current_thread())
            if number == 1:
                second_made.set()
            yield number

    received = []
    with RunAhead(items(), 2, "test ahead") as ahead:
        for number in ahead:
            if number == 0:  # the consumer holds the first item: the second is made meanwhile
                assert second_made.wait(WAIT)
            received.append(number)
    assert received == [0, 1, 2, 3, 4]
    assert threading.main_thread() not in made_by and len(set(made_by)) == 1
    assert not made_by[0].is_alive()


def test_a_failure_making_an_item_is_raised_to_the_consumer_as_it_was():
    failure = UserError("in.fasta, record 3 (p3): bad residue")

    def items():
        yield 0
        yield 1
        raise failure

    received = []
    with pytest.raises(UserError) as raised:
        with RunAhead(items(), 2, "test ahead") as ahead:
            received.extend(ahead)
    assert raised.value is failure and raised.value.exit_code == 2
    assert received == [0, 1]


def test_leaving_early_stops_the_thread_even_while_it_waits_for_room():
    made = []

    def items():
        for number in range(1000):
            made.append(number)
            yield number

    threads_before = threading.active_count()
    with pytest.raises(StopRequested):
        with RunAhead(items(), 2, "test ahead") as ahead:
            for number in ahead:
                raise StopRequested("SIGTERM")
    assert threading.active_count() == threads_before
    assert len(made) <= 4  # the one consumed, two queued, one waiting for room (it is put, then the thread stops)


def test_calls_run_in_order_on_another_thread_and_exit_waits_for_them():
    calls, threads = [], set()

    def call(number):
        calls.append(number)
        threads.add(threading.current_thread())

    with RunBehind(call, 1, "test behind") as behind:
        for number in range(20):
            behind.submit(number)
    assert calls == list(range(20))  # all of them finished at exit
    assert threading.main_thread() not in threads
    assert not any(thread.is_alive() for thread in threads)


def _failing_at(failure, at):
    calls = []

    def call(number):
        if number == at:
            raise failure
        calls.append(number)

    return call, calls


def test_a_failed_call_is_raised_by_a_later_submit_and_later_calls_are_skipped():
    failure = JobError("out.h5: cannot write rows (No space left on device)")
    call, calls = _failing_at(failure, 3)
    with pytest.raises(JobError) as raised:
        with RunBehind(call, 1, "test behind") as behind:
            for number in range(1000):
                behind.submit(number)
    assert raised.value is failure and raised.value.exit_code == 1
    assert calls == [0, 1, 2]


def test_a_failed_call_is_raised_at_exit_in_place_of_a_stop_request_but_not_of_another_error():
    failure = JobError("out.h5: cannot write rows (File too large)")
    for in_flight, expected in [(StopRequested("SIGTERM"), failure), (UserError("bad input"), None)]:
        call, calls = _failing_at(failure, 0)
        with pytest.raises(type(expected or in_flight)) as raised:
            with RunBehind(call, 1, "test behind") as behind:
                behind.submit(0)
                raise in_flight
        assert raised.value is (expected or in_flight)


def test_zero_depth_runs_everything_in_the_callers_thread():
    threads = []
    with RunAhead((threading.current_thread() for _ in range(3)), 0, "test ahead") as ahead:
        threads.extend(ahead)
    with RunBehind(lambda: threads.append(threading.current_thread()), 0, "test behind") as behind:
        behind.submit()
    assert threads == [threading.main_thread()] * 4

"""SQLite's in-process writers take turns in the order they came (``WriterQueue``)."""

from __future__ import annotations

import threading
import time

import pytest

from whenthen.storage.database import WriterQueue


def _wait_for(queue: WriterQueue, count: int) -> None:
    deadline = time.monotonic() + 10
    while queue.waiting() < count:
        assert time.monotonic() < deadline, "threads did not queue"
        time.sleep(0.001)


def test_waiters_are_served_in_the_order_they_came() -> None:
    queue = WriterQueue()
    order: list[int] = []

    def writer(n: int) -> None:
        with queue:
            order.append(n)

    threads = []
    with queue:
        for n in range(6):
            t = threading.Thread(target=writer, args=(n,))
            t.start()
            threads.append(t)
            _wait_for(queue, n + 2)  # the holder and every thread started so far
    for t in threads:
        t.join(10)
    assert order == list(range(6))
    assert queue.waiting() == 0


def test_a_releasing_thread_does_not_jump_the_queue() -> None:
    """The thread that just released it queues behind the one already waiting."""
    queue = WriterQueue()
    order: list[str] = []
    queue.__enter__()

    def other_writer() -> None:
        with queue:
            order.append("other")

    other = threading.Thread(target=other_writer)
    other.start()
    _wait_for(queue, 2)
    queue.__exit__()
    with queue:
        order.append("again")
    other.join(10)
    assert order == ["other", "again"]


def test_an_interrupted_waiter_gives_its_turn_up() -> None:
    queue = WriterQueue()
    queue.__enter__()
    # A ticket taken and abandoned (as KeyboardInterrupt inside the wait would).
    with queue._cond:
        ticket = queue._next
        queue._next += 1
        queue._abandoned.add(ticket)
    queue.__exit__()
    done = threading.Event()

    def writer() -> None:
        with queue:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert done.wait(10)
    t.join(10)
    assert queue.waiting() == 0


def test_an_error_inside_releases_the_turn() -> None:
    queue = WriterQueue()
    with pytest.raises(RuntimeError), queue:
        raise RuntimeError("boom")
    with queue:
        assert queue.waiting() == 1

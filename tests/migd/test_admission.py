"""The admission bookkeeping: who is dropped for whom, who waits, what is reserved."""

from __future__ import annotations

import asyncio

import pytest

from migd.admission import Admission, Gate, LogThrottle
from migd.errors import Busy, ConfigError
from migd.pipeline import BufferBank, receiver_buffers, sender_buffers


def test_gate_drops_the_oldest_of_the_same_host_first() -> None:
    g: Gate[str] = Gate(limit=4, per_host=2)
    assert g.enter("a1", "A") == [] and g.enter("a2", "A") == []
    assert g.enter("b1", "B") == []
    assert g.enter("a3", "A") == ["a1"]  # A is at its share: its own oldest goes
    assert len(g) == 3
    assert g.enter("c1", "C") == []
    assert g.enter("d1", "D") == ["a2"]  # full: the oldest of all goes
    g.leave("b1")
    g.leave("b1")  # twice is harmless
    assert g.enter("e1", "E") == [] and len(g) == 4


def test_a_flood_from_one_host_never_drops_another_hosts_connection() -> None:
    g: Gate[int] = Gate(limit=64, per_host=8)
    assert g.enter(-1, "peer") == []
    dropped = [k for i in range(10_000) for k in g.enter(i, "attacker")]
    assert -1 not in dropped and len(dropped) == 10_000 - 8


async def test_outgoing_migrations_queue_in_order_and_are_refused_when_the_queue_is_full(
        ) -> None:
    a = Admission(max_migrations=2, max_queued=2, budget=1000)
    t1, t2 = a.outgoing(1, 100), a.outgoing(1, 100)
    assert t1.admitted.is_set() and t2.admitted.is_set()
    vm = a.outgoing(2, 100)  # a VM's VFs together: waits for two slots
    t4 = a.outgoing(1, 100)
    assert (vm.position, t4.position) == (1, 2) and not vm.admitted.is_set()
    with pytest.raises(Busy, match=r"2 migration.s. running and 2 queued"):
        a.outgoing(1, 100)
    t1.leave()
    # one slot free, but the VM at the head needs two: nobody passes it
    assert not vm.admitted.is_set() and not t4.admitted.is_set()
    t2.leave()
    await asyncio.wait_for(vm.wait(), 1)
    assert vm.position == 0 and t4.position == 1 and a.running[True] == 2
    assert a.reserved == 200
    vm.leave()
    assert t4.admitted.is_set()  # one VF of the VM ended: its slot goes on
    vm.leave()
    t4.leave()
    assert a.running[True] == 0 and a.reserved == 0 and a.queued == 0


def test_the_buffer_budget_admits_what_fits_and_refuses_what_never_can() -> None:
    a = Admission(max_migrations=8, max_queued=8, budget=250)
    t1, t2 = a.outgoing(1, 100), a.outgoing(1, 100)
    t3 = a.outgoing(1, 100)
    assert not t3.admitted.is_set() and t3.position == 1
    with pytest.raises(Busy, match=r"receiving 0 migration.s."):
        a.incoming(100)  # the budget is shared by both directions
    with pytest.raises(ConfigError, match="more than the buffer budget"):
        a.outgoing(1, 300)
    with pytest.raises(ConfigError, match=r"needs more than max_migrations .8."):
        a.outgoing(9, 1)
    t1.leave()
    assert t3.admitted.is_set()
    t2.leave()
    t_in = a.incoming(100)
    assert a.running == {True: 1, False: 1}
    t_in.leave()
    t3.leave()
    assert a.reserved == 0


def test_a_queued_migration_that_gives_up_leaves_the_queue() -> None:
    a = Admission(max_migrations=1, max_queued=4, budget=1000)
    t1 = a.outgoing(1, 10)
    waiting = a.outgoing(1, 10)
    later = a.outgoing(1, 10)
    waiting.leave()  # cancelled while queued
    assert waiting.position == 0 and later.position == 1 and a.queued == 1
    t1.leave()
    assert later.admitted.is_set() and a.reserved == 10


def test_incoming_are_refused_busy_at_the_limit() -> None:
    a = Admission(max_migrations=2, max_queued=0, budget=1 << 30)
    held = [a.incoming(1), a.incoming(1)]
    with pytest.raises(Busy, match="max_migrations 2"):
        a.incoming(1)
    out = a.outgoing(1, 1)  # the other direction has its own slots
    assert out.admitted.is_set()
    held[0].leave()
    assert a.incoming(1).admitted.is_set()


def test_log_throttle_says_how_many_it_left_out() -> None:
    t = LogThrottle(burst=3, window=10)
    assert [t.allow(0.0)[0] for _ in range(5)] == [True, True, True, False, False]
    assert t.allow(5.0) == (False, 0)
    assert t.allow(10.0) == (True, 3)
    assert t.allow(11.0) == (True, 0)


def test_the_reservation_covers_what_a_stream_takes_from_the_bank() -> None:
    chunk = 1 << 20
    assert sender_buffers(chunk, 8, keep=False) < sender_buffers(chunk, 8, keep=True)
    assert 47 << 20 < sender_buffers(chunk) < 49 << 20
    assert 15 << 20 < receiver_buffers(chunk, 2) < 17 << 20
    assert receiver_buffers(chunk, 16) > receiver_buffers(chunk, 1)  # two slots a channel


def test_the_bank_keeps_no_more_free_than_its_limit() -> None:
    bank = BufferBank(limit=3 * 4096)
    sets = [bank.take((4096,)) for _ in range(5)]
    assert bank.out == 5 * 4096 and bank.free == 0
    for s in sets:
        bank.give((4096,), s)
    assert bank.out == 0 and bank.free == 3 * 4096  # two were let go
    again = bank.take((4096,))
    # (it keeps a set only while what it holds in all stays within the limit)
    assert any(again is s for s in sets[2:]) and bank.free == 2 * 4096

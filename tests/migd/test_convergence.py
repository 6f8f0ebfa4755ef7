"""The VM's switchover estimate: its rest at its rate, every device past its initial bytes."""

from __future__ import annotations

import pytest

from migd.convergence import Convergence

MB = 1_000_000


def vm(*members: tuple[int, int], limit_ms: int = 100, initial_done: bool = True,
       final: bool = False) -> Convergence:
    """A VM whose pre-copy began at t=0, each member (pending, sent)."""
    c = Convergence(len(members), limit_ms)
    c.start(0.0)
    for i, (pending, sent) in enumerate(members):
        c.report(i, pending=pending, sent=sent, initial_done=initial_done, final=final)
    return c


def test_the_rest_of_the_vm_at_the_vm_s_rate() -> None:
    # Each device alone: 10 MB at 100 MB/s, 100 ms.  Together: 20 MB at 200 MB/s.
    assert vm((10 * MB, 100 * MB), (10 * MB, 100 * MB)).expected_ms(1.0) == 100
    assert vm((10 * MB, 100 * MB), (10 * MB, 100 * MB), limit_ms=100).converged(1.0)
    assert not vm((10 * MB, 100 * MB), (10 * MB, 100 * MB), limit_ms=99).converged(1.0)


def test_a_device_that_fits_alone_does_not_make_the_vm_fit() -> None:
    # vf0 alone: 1 MB at 100 MB/s = 10 ms.  The VM: 31 MB at 200 MB/s = 155 ms.
    c = vm((1 * MB, 100 * MB), (30 * MB, 100 * MB), limit_ms=100)
    assert c.expected_ms(1.0) == 155
    assert not c.converged(1.0)
    c.report(1, pending=5 * MB, sent=130 * MB, initial_done=True, final=False)
    assert c.expected_ms(1.2) == 31  # 6 MB at 230 MB in 1.2 s
    assert c.converged(1.2)


def test_no_estimate_before_every_device_is_past_its_initial_bytes() -> None:
    c = Convergence(2, 100)
    c.start(0.0)
    c.report(0, pending=0, sent=100 * MB, initial_done=True, final=True)
    assert not c.converged(1.0)  # vf1 has not reported at all
    c.report(1, pending=1, sent=100 * MB, initial_done=False, final=False)
    assert not c.converged(1.0)  # nor finished its initial bytes
    c.report(1, pending=1, sent=100 * MB, initial_done=True, final=False)
    assert c.converged(1.0)


def test_a_limit_of_zero_takes_nothing_pending() -> None:
    assert not vm((1, 100 * MB), limit_ms=0).converged(1.0)  # 0.01 us is not 0 ms
    assert vm((0, 100 * MB), limit_ms=0).converged(1.0)


def test_without_a_rate_only_an_empty_or_exhausted_vm_converges() -> None:
    assert vm((5, 0), (5, 0)).expected_ms(1.0) is None
    assert not vm((5, 0), (5, 0)).converged(1.0)
    assert vm((0, 0), (0, 0)).converged(1.0)
    assert vm((5, 0), (5, 0), final=True).converged(1.0)


def test_every_device_must_be_unable_to_iterate_before_an_unfitting_vm_stops() -> None:
    c = vm((50 * MB, 10 * MB), (50 * MB, 10 * MB), limit_ms=100)
    c.report(0, pending=50 * MB, sent=10 * MB, initial_done=True, final=True)
    assert not c.converged(1.0)  # vf1 can still send its part
    c.report(1, pending=50 * MB, sent=10 * MB, initial_done=True, final=True)
    assert c.converged(1.0)


def test_the_answer_holds_once_given() -> None:
    c = vm((1 * MB, 100 * MB), limit_ms=100)
    assert c.converged(1.0)
    c.report(0, pending=900 * MB, sent=100 * MB, initial_done=True, final=False)
    assert c.converged(2.0)  # every device reads the same answer


def test_the_rate_counts_from_the_first_device_s_start() -> None:
    c = Convergence(2, 100)
    c.start(1.0)
    c.start(3.0)  # a later device does not restart the clock
    c.report(0, pending=0, sent=200 * MB, initial_done=True, final=False)
    assert c.rate(5.0) == 50 * MB
    assert c.rate(1.0) == 0.0


def test_a_device_without_pre_copy_counts_with_all_it_holds() -> None:
    c = Convergence(2, 100)
    c.start(0.0)
    c.report(0, pending=1 * MB, sent=100 * MB, initial_done=True, final=False)
    assert not c.converged(1.0)  # vf1 has said nothing yet
    c.done(1, rest=30 * MB)  # it stops with its whole state: 31 MB at 100 MB/s
    assert c.expected_ms(1.0) == 310 and not c.converged(1.0)
    c.report(0, pending=0, sent=200 * MB, initial_done=True, final=True)
    assert c.converged(1.0)  # nobody can do better
    c.done(0, rest=99 * MB)  # a device that reported keeps its figures
    assert c.pending() == 30 * MB


def test_a_vm_has_a_device() -> None:
    with pytest.raises(ValueError, match="at least one device"):
        Convergence(0, 100)

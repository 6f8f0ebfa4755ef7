"""Pacing decisions, fed measurements and time: no clocks, no sockets."""

from __future__ import annotations

import pytest

from migd.pacing import AutoPolicy, TokenBucket, Window

MiB = 1 << 20


def test_token_bucket_paces_to_the_rate() -> None:
    b = TokenBucket(100 * MiB, now=0.0, burst=MiB)
    assert b.delay(MiB, 0.0) == 0.0  # the burst
    assert b.delay(MiB, 0.0) == pytest.approx(0.01)  # then 1 MiB per 10 ms
    assert b.delay(MiB, 0.0) == pytest.approx(0.02)
    assert b.delay(MiB, 1.0) == 0.0  # idle time refills, up to the burst only
    assert b.delay(2 * MiB, 1.0) == pytest.approx(0.02)  # that refill was spent just above
    with pytest.raises(ValueError):
        TokenBucket(0, now=0.0)


def window(compressed: bool, state: int, wire: int, seconds: float, waiting: float,
           ratio: float = 3.5, codec: float = 900e6) -> Window:
    probe_in = 16 * MiB if compressed else MiB
    return Window(compressed, state, wire, seconds, waiting, compress_cpu=probe_in / codec,
                  compress_in=probe_in, compress_out=int(probe_in / ratio))


def test_fast_link_never_compresses() -> None:
    """CPU-bound at 2.5 GB/s: the sender hardly waits for the link."""
    p = AutoPolicy(threads=2)
    for _ in range(40):
        assert p.record(window(False, 16 * MiB, 16 * MiB, 16 * MiB / 2.5e9, 0.0005)) is False
    assert p.compressed_windows == 0


def test_samples_are_compressed_only_while_they_can_change_a_decision() -> None:
    p = AutoPolicy(threads=2)
    assert p.wants_probe()  # nothing measured yet
    fast = 16 * MiB / 2.5e9
    p.record(window(False, 16 * MiB, 16 * MiB, fast, 0.0))
    assert not p.wants_probe()  # CPU-bound, the compressor measured: a sample is pure cost
    slow = 16 * MiB / 100e6
    p.record(window(False, 16 * MiB, 16 * MiB, slow, 0.9 * slow))
    assert p.wants_probe()  # the link became the limit: keep the measurements fresh
    p.record(window(False, 16 * MiB, 16 * MiB, fast, 0.0))
    assert not p.wants_probe()
    capped = AutoPolicy(threads=2, cap=250e6)
    capped.record(window(False, 16 * MiB, 16 * MiB, fast, 0.0))
    assert capped.wants_probe()  # a cap: compressing may pay whatever the windows say


def test_capped_link_compresses_and_keeps_compressing() -> None:
    """250 MB/s cap: the sender waits most of each window; the data compresses 3.5x."""
    p = AutoPolicy(threads=2)
    secs = 16 * MiB / 250e6
    assert p.record(window(False, 16 * MiB, 16 * MiB, secs, 0.9 * secs)) is False  # warm-up
    assert p.record(window(False, 16 * MiB, 16 * MiB, secs, 0.9 * secs)) is True
    decisions = []
    for _ in range(1, 24):
        comp = p.compress
        state = 16 * MiB
        wire = state if not comp else int(state / 3.5)
        secs = wire / 250e6
        decisions.append(p.record(window(comp, state, wire, secs, 0.9 * secs)))
    # compresses throughout, except the periodic re-measurement of raw
    assert decisions.count(True) >= 18 and p.predicted_compressed() is not None
    assert p.predicted_compressed() > 2.5 * 250e6  # type: ignore[operator]


def test_incompressible_data_is_not_compressed_even_on_a_slow_link() -> None:
    p = AutoPolicy(threads=2)
    secs = 16 * MiB / 100e6
    for _ in range(10):
        p.record(window(p.compress, 16 * MiB, 16 * MiB, secs, 0.9 * secs, ratio=1.01))
    assert p.compress is False


def test_a_link_that_gets_faster_stops_compression() -> None:
    p = AutoPolicy(threads=2, explore_every=4)
    slow = 16 * MiB / 100e6
    for _ in range(2):  # warm-up, then a measured raw window
        p.record(window(False, 16 * MiB, 16 * MiB, slow, 0.9 * slow))
    assert p.compress
    fast = 16 * MiB / 3e9
    for _ in range(8):  # the link became fast: compressing windows are now CPU-bound
        comp = p.compress
        p.record(window(comp, 16 * MiB, int(16 * MiB / 3.5) if comp else 16 * MiB,
                        16 * MiB / 1.2e9 if comp else fast, 0.0))
    assert p.compress is False


def test_a_slow_receiver_is_not_mistaken_for_a_slow_link() -> None:
    """The sender waits on the socket because the receiver is busy; compressing was
    tried and measured slower: it stays raw, retrying only now and then."""
    p = AutoPolicy(threads=2, explore_every=16)
    raw = 16 * MiB / 1.0e9  # the prediction (2 x 0.9 GB/s) promises more than this
    for _ in range(2):  # warm-up, then a measured raw window that looks link-bound
        p.record(window(False, 16 * MiB, 16 * MiB, raw, 0.6 * raw))
    assert p.compress  # compression not measured yet: try it
    comp = 16 * MiB / 0.9e9
    for _ in range(2):  # a switch's window, then a measured one: slower
        p.record(window(True, 16 * MiB, int(16 * MiB / 3.5), comp, 0.0))
    assert not p.compress
    decisions = [p.record(window(p.compress, 16 * MiB, 16 * MiB, raw, 0.6 * raw))
                 for _ in range(30)]
    # only the periodic re-measurement (every 16 windows): the switch's window and
    # the measured one
    assert decisions.count(True) <= 4
    assert decisions[:10].count(True) == 0


def test_a_slow_start_does_not_lock_compression_in() -> None:
    """Seen on rdma+tcp: the start-up window measured raw slow, compression then
    looked faster, and it compressed 60 of 64 windows at a third of the speed."""
    p = AutoPolicy(threads=2, explore_every=16)
    start = 16 * MiB / 0.3e9
    p.record(window(False, 16 * MiB, 16 * MiB, start, 0.5 * start))  # start-up: slow
    decisions = []
    for _ in range(63):
        comp = p.compress
        secs = 16 * MiB / (0.7e9 if comp else 1.8e9)  # raw is faster; both wait a little
        decisions.append(p.record(window(comp, 16 * MiB, int(16 * MiB / 3.5) if comp
                                         else 16 * MiB, secs, 0.4 * secs)))
    assert p.raw_rate is not None and p.raw_rate > 1.5e9  # the start-up did not count
    assert decisions.count(True) <= 12  # a few explorations, not a lock-in


def test_a_known_cap_decides_without_exploring() -> None:
    p = AutoPolicy(threads=2, cap=250e6)
    secs = 16 * MiB / 250e6
    decisions = [p.record(window(p.compress, 16 * MiB, 16 * MiB, secs, 0.9 * secs))
                 for _ in range(40)]
    assert all(decisions)  # 2 x 0.9 GB/s of compressor, 3.5x: far above 250 MB/s
    fast = AutoPolicy(threads=2, cap=10e9)  # a cap above what compression can reach
    assert not any(fast.record(window(fast.compress, 16 * MiB, 16 * MiB, 0.01, 0.0))
                   for _ in range(10))

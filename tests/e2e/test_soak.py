"""The soak tool (``migd soak``): a bounded slice of it, and the resume bug it found."""

from __future__ import annotations

import pytest

from migd import soak
from migd.harness import local_pair

QUICK = ["--idle-timeout", "3", "--resume-timeout", "5", "--resolve-timeout", "5"]


@pytest.mark.parametrize("transport, channels", [("tcp", 1), ("tcp", 2), ("rdma+tcp", 2)])
def test_a_link_cut_while_the_source_waits_for_its_initial_bytes_is_resumed(
        transport: str, channels: int) -> None:
    # A 2 MiB VF is read out at once: the source then only waits for the destination
    # to load it (switchover-ack).  Found by the soak: the resumed link never sent
    # the chunks the cut lost, and both sides waited for each other until they gave up.
    with local_pair(["vf0:mlx5:size=2M"], ["vf0:mlx5:size=2M,content=zero"],
                    src_extra=QUICK, dst_extra=QUICK) as p:
        proxy = soak.DamagingProxy(soak._host_port(p.dst.address_of(transport)))
        try:
            trial = soak.Trial(0, transport, channels, "none", 5,
                               soak.Damage("cut", channels - 1, True, 150_000, 1))
            soak._run_trial(p, p.src, p.dst, proxy, trial, 60)
        finally:
            proxy.close()
        assert trial.fired and trial.resumes == 1, trial
        assert trial.outcome == "completed-verified" and trial.seconds < 3, trial


def test_a_slice_of_the_soak_ends_every_trial_safely() -> None:
    summary = soak.run_soak(trials=12, seed=7)
    counts = summary.counts()
    assert sum(counts.values()) == 12 and summary.ok, summary.report()
    assert counts["completed-verified"] > 0 and counts["failed-source-intact"] > 0
    assert sum(t.fired for t in summary.trials) >= 6

"""The journal: durable, atomic records; damage stops a start, naming the file."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from migd import journal
from migd.errors import ConfigError
from migd.journal import Journal, Record


def rec(phase: str = journal.ACTIVE, role: str = "source", mid: str = "abc123") -> Record:
    return Record(role=role, id=mid, phase=phase, device="vf0", peer=["tcp://h:1"],
                  peer_key="00" * 32)


def test_records_survive_and_replace_each_other(tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path))
    r = rec()
    j.write(r)
    r.phase = journal.COMMIT
    j.write(r)
    j.write(rec(journal.VOTED, "destination", "xyz"))
    again = Journal(str(tmp_path))
    loaded = {x.key: x for x in again.load()}
    assert loaded["source-abc123"].phase == journal.COMMIT
    assert loaded["destination-xyz"].open and loaded["destination-xyz"].device == "vf0"
    assert sorted(os.listdir(tmp_path)) == ["destination-xyz.json", "source-abc123.json"]


def test_a_write_that_never_completed_is_not_a_record(tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path))
    j.write(rec())
    (tmp_path / "source-other.json.tmp").write_text('{"half')  # a crash mid-write
    assert [r.key for r in Journal(str(tmp_path)).load()] == ["source-abc123"]
    assert not (tmp_path / "source-other.json.tmp").exists()


def test_a_version_a_crash_cut_short_was_never_written(tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path))
    r = rec()
    j.write(r)
    r.phase = journal.COMMIT
    j.write(r)  # appended: one flush
    path = tmp_path / "source-abc123.json"
    assert path.read_bytes().count(b"\n") == 2
    with open(path, "ab") as f:
        f.write(b'{"format": 1, "record": {"phase": "completed"')  # torn, no newline
    again = Journal(str(tmp_path))
    (loaded,) = again.load()
    assert loaded.phase == journal.COMMIT
    # The torn tail is cut off, so the next version is not glued to it.
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 2
    loaded.phase = journal.COMPLETED
    again.write(loaded)
    assert Journal(str(tmp_path)).load()[0].phase == journal.COMPLETED


def test_a_record_a_host_crash_left_empty_is_dropped(tmp_path: pathlib.Path) -> None:
    # Only records written without flushes (a migration started, began loading) can be
    # left empty or torn before their first newline; their loss changes nothing.
    (tmp_path / "destination-xyz.json").write_bytes(b"")
    (tmp_path / "source-abc.json").write_bytes(b'{"format": 1, "rec')
    assert Journal(str(tmp_path)).load() == []
    assert os.listdir(tmp_path) == []


def test_a_record_created_lightly_is_flushed_whole_by_its_first_vote(
        tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path))
    r = rec(journal.LOADING, "destination", "xyz")
    j.write(r, durable=False)
    assert "destination-xyz" in j._shaky
    r.phase = journal.VOTED
    j.write(r)  # durable: the file and its name too, not only the new line
    assert "destination-xyz" not in j._shaky


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(p.read_bytes()[:40] + b"\n"), "not valid JSON"),
    (lambda p: p.write_bytes(b"\xff\xfe garbage\n"), "not valid JSON"),
    (lambda p: p.write_text(p.read_text().replace('"active"', '"commit"')), "checksum mismatch"),
    (lambda p: p.write_text(json.dumps({"format": 9}) + "\n"), "unknown format"),
    (lambda p: p.write_text(json.dumps([1, 2]) + "\n"), "unknown format"),
])
def test_a_damaged_record_stops_the_start_naming_the_file(tmp_path: pathlib.Path, damage: object,
                                                          why: str) -> None:
    Journal(str(tmp_path)).write(rec())
    path = tmp_path / "source-abc123.json"
    damage(path)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=f"journal {path} is damaged \\({why}"):
        Journal(str(tmp_path)).load()


def test_a_record_in_the_wrong_file_or_with_bad_fields(tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path))
    j.write(rec())
    os.rename(tmp_path / "source-abc123.json", tmp_path / "source-other.json")
    with pytest.raises(ConfigError, match="in the wrong file"):
        Journal(str(tmp_path)).load()
    with pytest.raises(ConfigError, match="bad record key"):
        j.write(rec(mid="../escape"))


def test_ended_migrations_are_pruned_after_the_retention(tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path))
    j.write(rec(journal.COMPLETED, mid="old"))
    j.write(rec(journal.ACTIVE, mid="open"))
    now = j.records["source-old"].updated
    assert j.prune(now + 10, retention=60) == []
    assert j.prune(now + 120, retention=60) == ["source-old"]
    assert [r.id for r in Journal(str(tmp_path)).load()] == ["open"]  # open ones stay


def test_an_unusable_directory_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"state_dir {blocker}/j"):
        Journal(str(blocker / "j"))

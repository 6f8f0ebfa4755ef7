"""Native journal logging, against a datagram socket standing in for journald, with
a real migration between two daemons."""

from __future__ import annotations

import os
import pathlib
import socket
import struct

from migd import journald
from migd.harness import local_pair


def parse(datagram: bytes) -> dict[str, str]:
    """The journal's native protocol: KEY=value lines, or KEY, length, binary value."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(datagram):
        nl = datagram.index(b"\n", pos)
        line = datagram[pos:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
            pos = nl + 1
        else:
            (n,) = struct.unpack_from("<Q", datagram, nl + 1)
            out[line.decode()] = datagram[nl + 9 : nl + 9 + n].decode()
            pos = nl + 9 + n + 1
    return out


def test_fields_with_a_newline_are_length_prefixed() -> None:
    assert parse(journald._field("MESSAGE", "a\nb") + journald._field("X", "y")) == {
        "MESSAGE": "a\nb", "X": "y"}


def test_under_journal_only_when_the_stream_is_stderr(tmp_path: pathlib.Path) -> None:
    st = os.fstat(2)
    assert journald.under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not journald.under_journal({"JOURNAL_STREAM": "1:2"})
    assert not journald.under_journal({})


def test_a_migration_is_found_by_its_id_in_the_journal(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    journal.settimeout(1.0)
    log_file = tmp_path / "stderr"
    log_file.write_text("")
    st = os.stat(log_file)
    # JOURNAL_STREAM names a file the daemon's stderr is not: plain lines there.
    env = {"MIGD_JOURNAL_SOCKET": path, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with local_pair(["vf0:sim:size=4M"], ["vf0:sim:size=4M,content=zero"],
                    src_env=env) as p:
        # ... and for the source: its stderr is its log file, which JOURNAL_STREAM names.
        p.src.proc.kill()
        p.src.proc.wait()
        st = os.stat(p.src.log_path)
        p.src.restart(env={**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        with p.src.client() as c:
            final = c.migrate_follow({"device": "vf0", "peer": p.dst.address})
        assert final["status"] == "completed"
        records = []
        try:
            while True:
                records.append(parse(journal.recv(1 << 16)))
        except TimeoutError:
            pass
        assert "migration" in p.dst.log()  # the destination: plain lines
    mine = [r for r in records if r.get("MIGD_MIGRATION_ID") == final["id"]]
    ids = {r.get("MESSAGE_ID") for r in mine}
    assert {journald.MESSAGE_IDS["started"], journald.MESSAGE_IDS["completed"]} <= ids
    assert all(r["SYSLOG_IDENTIFIER"] == "migd" and r["MIGD_DEVICE"] == "vf0" for r in mine)
    assert any(r.get("MIGD_PEER") for r in mine) and len(mine) >= 3
    done = next(r for r in mine if r.get("MESSAGE_ID") == journald.MESSAGE_IDS["completed"])
    assert done["PRIORITY"] == "6" and done["MESSAGE"].endswith("completed")

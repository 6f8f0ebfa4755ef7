"""Control messages: typed, and checked field by field when they arrive."""

from __future__ import annotations

from typing import Any

import pytest

from migd.errors import ProtocolError
from migd.protocol.messages import (
    MESSAGES,
    Ack,
    End,
    Migrate,
    Outcome,
    Resume,
    decode,
    encode,
)


def test_every_message_round_trips() -> None:
    for cls in MESSAGES.values():
        msg = cls()
        wire = encode(msg)
        assert wire["t"] == cls.T
        fields = {k: v for k, v in wire.items() if k != "t"}
        # The defaults of sized fields are empty; give them their size to decode.
        for k, v in fields.items():
            if v == b"":
                fields[k] = bytes(32)
        assert decode({"t": cls.T, **fields}) == cls(**fields)


def test_unknown_fields_are_ignored_unknown_messages_are_not() -> None:
    assert decode({"t": "ack", "index": 3, "offset": 7, "later": "x"}) == Ack(index=3, offset=7)
    with pytest.raises(ProtocolError, match="unknown control message 'bogus'"):
        decode({"t": "bogus"})
    with pytest.raises(ProtocolError, match="unknown control message None"):
        decode({"index": 1})


@pytest.mark.parametrize("msg, where", [
    ({"t": "ack", "index": 1}, "ack: field 'offset' missing"),
    ({"t": "ack", "index": "1", "offset": 0}, "ack: field 'index' must be a whole number"),
    ({"t": "ack", "index": True, "offset": 0}, "ack: field 'index' must be a whole number"),
    ({"t": "ack", "index": -1, "offset": 0}, "ack: field 'index' must be a whole number"),
    ({"t": "ack", "index": 1 << 64, "offset": 0}, "ack: field 'index' must be a whole number"),
    ({"t": "end", "length": 1, "chunks": 1, "digest": b"x"}, "end: field 'digest' must be 32"),
    ({"t": "end", "length": 1, "chunks": 1, "digest": "x" * 32}, "end: field 'digest' must be 32"),
    ({"t": "outcome", "id": "a" * 65, "decision": "commit"}, "outcome: field 'id' must be a string"),
    ({"t": "resume", "id": "m", "token": bytes(32), "index": 0, "offset": 0, "channels": 1.0},
     "resume: field 'channels' must be a whole number"),
])
def test_a_wrong_field_names_message_and_field(msg: dict[str, Any], where: str) -> None:
    with pytest.raises(ProtocolError, match=where):
        decode(msg)


def test_the_migrate_request_is_checked_whole() -> None:
    good = encode(Migrate(id="m", device="vf0", kind="sim", compat={"model": "x"},
                          reply_to=["tcp://10.0.0.1:7707"]))
    assert decode(good).reply_to == ["tcp://10.0.0.1:7707"]  # type: ignore[attr-defined]
    for field, bad, why in [("precopy", 1, "must be true or false"),
                            ("compat", [1], "must be a map"),
                            ("compat", {str(i): i for i in range(40)}, "must be a map"),
                            ("reply_to", ["x"] * 20, "must be a list"),
                            ("reply_to", [1], "must be a list"),
                            ("device", None, "must be a string")]:
        with pytest.raises(ProtocolError, match=f"migrate: field '{field}' {why}"):
            decode(dict(good, **{field: bad}))


def test_messages_are_values() -> None:
    assert End(length=1, chunks=1, digest=bytes(32)) == End(length=1, chunks=1,
                                                           digest=bytes(32))
    assert Outcome(id="a", decision="commit") != Outcome(id="a", decision="abort")
    assert Resume(id="a").T == "resume"

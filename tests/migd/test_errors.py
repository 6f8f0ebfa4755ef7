from __future__ import annotations

from migd import errors


def test_codes_are_unique_and_round_trip() -> None:
    seen: dict[int, type[errors.MigdError]] = {}
    for cls in errors.ERRORS_BY_CODE.values():
        assert cls.code not in seen or seen[cls.code] is cls
        seen[cls.code] = cls
        rebuilt = errors.from_wire(*errors.to_wire(cls("why")))
        assert type(rebuilt.remote) is cls and rebuilt.remote.message == "why"


def test_internals_never_cross() -> None:
    assert errors.to_wire(KeyError("/etc/shadow")) == (1, "internal error")
    assert isinstance(errors.from_wire(9999, "x").remote, errors.MigdError)


def test_illegal_transition_names_role_state_event() -> None:
    e = errors.IllegalTransition("source", "active", "committed")
    assert "source" in str(e) and "active" in str(e) and "committed" in str(e)

from __future__ import annotations

import pytest

from migd import errors


def test_every_code_is_registered_once_and_round_trips() -> None:
    from backends.emulated import mlx5_firmware as fw  # it defines one of its own

    def subclasses(cls: type[errors.MigdError]) -> list[type[errors.MigdError]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    every: list[type[errors.MigdError]] = [errors.MigdError, *subclasses(errors.MigdError)]
    assert sorted(errors.ERRORS_BY_CODE) == sorted(c.code for c in every)
    assert all(errors.ERRORS_BY_CODE[c.code] is c for c in every)
    for cls in every:
        rebuilt = errors.from_wire(cls.code, "why").remote
        assert rebuilt.message == "why"
        if cls not in (errors.RemoteError, errors.ControlError, fw.AdminError):
            assert type(rebuilt) is cls, cls  # the others stand for no peer's class


def test_a_class_without_its_own_code_or_with_anothers_is_refused() -> None:
    with pytest.raises(TypeError, match="code 23 is IntegrityError's already"):
        type("Clash", (errors.ProtocolError,), {"code": 23})
    with pytest.raises(TypeError, match="Codeless needs a wire code of its own"):
        type("Codeless", (errors.DeviceError,), {})


def test_internals_never_cross() -> None:
    assert errors.to_wire(KeyError("/etc/shadow")) == (1, "internal error")
    assert isinstance(errors.from_wire(9999, "x").remote, errors.MigdError)


def test_illegal_transition_names_role_state_event() -> None:
    e = errors.IllegalTransition("source", "active", "committed")
    assert "source" in str(e) and "active" in str(e) and "committed" in str(e)

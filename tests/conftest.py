from __future__ import annotations

import pytest

from migd.identity import AuthorizedKeys, Identity


@pytest.fixture(scope="session")
def ids() -> dict[str, Identity]:
    return {n: Identity.generate() for n in ("src", "dst", "mallory")}


@pytest.fixture
def trust(ids: dict[str, Identity]) -> AuthorizedKeys:
    """src and dst trust each other; mallory is nobody's."""
    return AuthorizedKeys({ids["src"].public: "src", ids["dst"].public: "dst"})

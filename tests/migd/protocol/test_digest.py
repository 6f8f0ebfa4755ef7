"""The stream digest folds each DATA frame's header and tag: the same value on
both sides, whichever way it is folded, and any changed header or tag shows."""

from __future__ import annotations

import hashlib
import os

from migd.protocol.digest import StreamDigest, body_size, sealed_size


def frames(n: int) -> list[tuple[bytes, bytes]]:
    return [(os.urandom(36), os.urandom(100 + i)) for i in range(n)]


def test_folding_now_or_later_gives_one_value() -> None:
    fs = frames(5)
    now, later = StreamDigest(), StreamDigest()
    for h, p in fs:
        now.fold_frame(h, p)
    later.fold_frame(*fs[0])
    pending = [StreamDigest.part(h, p) for h, p in fs[1:]]
    assert later.value(pending) == now.value()
    assert later.value() != now.value()  # pending parts were not folded in
    for part in pending:
        later.fold(part)
    assert later.value() == now.value()


def test_it_hashes_headers_and_tags_in_order() -> None:
    fs = frames(3)
    d = StreamDigest()
    for h, p in fs:
        d.fold_frame(h, memoryview(p))
    expect = hashlib.sha256(b"".join(h + p[-16:] for h, p in fs)).digest()
    assert d.value() == expect
    swapped = StreamDigest()
    for h, p in (fs[1], fs[0], fs[2]):
        swapped.fold_frame(h, p)
    assert swapped.value() != expect


def test_a_changed_header_or_tag_changes_it_but_not_the_ciphertext() -> None:
    h, p = frames(1)[0]
    base = StreamDigest.part(h, p)
    assert StreamDigest.part(bytes([h[0] ^ 1]) + h[1:], p) != base
    assert StreamDigest.part(h, p[:-1] + bytes([p[-1] ^ 1])) != base
    # The ciphertext is bound by its tag (the AEAD checks it), not hashed again.
    assert StreamDigest.part(h, bytes([p[0] ^ 1]) + p[1:]) == base


def test_sizes_of_a_sealed_payload() -> None:
    assert body_size(sealed_size(1 << 20)) == 1 << 20
    assert sealed_size(0) == 16

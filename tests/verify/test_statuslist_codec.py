"""The Token Status List codec against the draft's test vectors (encode and decode)."""

from __future__ import annotations

import base64
import json
import random
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.errors import TokenRejected
from auth_rpc.verify.statuslist import (
    StatusList,
    StatusReference,
    decode_lst,
    encode_lst,
    parse_status_claim,
)

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).with_name("data") / "status_list_vectors.json").read_text()
)["vectors"]


def _name(vector: dict[str, Any]) -> str:
    return f"{vector['bits']}bit-{vector['size']}"


@pytest.mark.parametrize("vector", VECTORS, ids=_name)
def test_encoding_matches_the_drafts_test_vectors(vector: dict[str, Any]) -> None:
    if "byte_array" in vector:
        data = bytes.fromhex(vector["byte_array"])
        assert encode_lst(data) == vector["lst"]
        status_list = StatusList(data, vector["bits"])
    else:
        statuses = {int(i): v for i, v in vector["statuses"].items()}
        status_list = StatusList.build(vector["size"], statuses, bits=vector["bits"])
    assert status_list.to_json() == {"bits": vector["bits"], "lst": vector["lst"]}


@pytest.mark.parametrize("vector", VECTORS, ids=_name)
def test_decoding_matches_the_drafts_test_vectors(vector: dict[str, Any]) -> None:
    status_list = StatusList.from_json({"bits": vector["bits"], "lst": vector["lst"]})
    assert status_list.size == vector["size"]
    if "byte_array" in vector:
        assert status_list.data == bytes.fromhex(vector["byte_array"])
        return
    statuses = {int(i): v for i, v in vector["statuses"].items()}
    for index, value in statuses.items():
        assert status_list.get(index) == value
    others = [i for i in random.Random(7).sample(range(vector["size"]), 2000) if i not in statuses]
    assert all(status_list.get(i) == 0 for i in others)
    assert sum(1 for byte in status_list.data if byte) <= len(statuses)


@pytest.mark.parametrize("vector", VECTORS, ids=_name)
def test_the_run_length_encoding_the_service_uses_decodes_the_same(
    vector: dict[str, Any],
) -> None:
    status_list = StatusList.from_json({"bits": vector["bits"], "lst": vector["lst"]})
    fast = status_list.to_json(rle=True)
    assert StatusList.from_json(fast).data == status_list.data
    # Still DEFLATE in the ZLIB format: any zlib reads it.
    lst = str(fast["lst"])
    assert zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4))) == (
        status_list.data
    )


def test_the_drafts_first_example_bit_by_bit() -> None:
    # Section 4.1: status[0..15] = 1 0 0 1 1 1 0 1 | 1 1 0 0 0 1 0 1 -> 0xB9 0xA3.
    bits = [1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1]
    status_list = StatusList.build(16, [i for i, b in enumerate(bits) if b])
    assert status_list.data == b"\xb9\xa3"
    assert [status_list.get(i) for i in range(16)] == bits
    assert zlib.compress(status_list.data, 9).hex() == "78dadbb918000217015d"


def test_bits_are_packed_least_significant_first() -> None:
    assert StatusList.build(16, [0]).data == b"\x01\x00"
    assert StatusList.build(16, [7]).data == b"\x80\x00"
    assert StatusList.build(16, [8]).data == b"\x00\x01"
    assert StatusList.build(4, {1: 2}, bits=2).data == b"\x08"
    assert StatusList.build(2, {1: 0xA}, bits=4).data == b"\xa0"


def test_out_of_range() -> None:
    status_list = StatusList.build(16, [3])
    with pytest.raises(IndexError):
        status_list.get(16)
    with pytest.raises(IndexError):
        status_list.get(-1)
    with pytest.raises(ValueError):
        StatusList.build(16, [16])
    with pytest.raises(ValueError):
        StatusList.build(8, {0: 2}, bits=1)
    with pytest.raises(ValueError):
        StatusList(b"", bits=3)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "eNrbuRgAAhcBXQ==",  # padding is not base64url as JWS uses it
        "eNrbuRgAAhcBXQ!",
        base64.urlsafe_b64encode(b"not zlib").rstrip(b"=").decode(),
        # two streams, or trailing bytes after the one stream
        base64.urlsafe_b64encode(zlib.compress(b"\x01") + b"x").rstrip(b"=").decode(),
        base64.urlsafe_b64encode(zlib.compress(b"\x01")[:-2]).rstrip(b"=").decode(),
    ],
)
def test_malformed_lst_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        decode_lst(value)


def test_a_list_larger_than_allowed_is_refused_without_inflating_it() -> None:
    bomb = encode_lst(bytes(50_000_000))  # ~50 MB of zeros in ~50 KB
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="larger than"):
            decode_lst(bomb, max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize(
    ("bits", "lst"), [(3, "eNrbuRgAAhcBXQ"), (True, "eNrbuRgAAhcBXQ"), (1, 5), (1, None)]
)
def test_malformed_status_list_claim(bits: Any, lst: Any) -> None:
    with pytest.raises(ValueError):
        StatusList.from_json({"bits": bits, "lst": lst})
    with pytest.raises(ValueError):
        StatusList.from_json(["not", "an", "object"])


def test_status_claim() -> None:
    uri = "https://auth.example/statuslists/1"
    claims = {"status": {"status_list": {"idx": 7, "uri": uri}}}
    assert parse_status_claim(claims) == StatusReference(uri, 7)
    assert parse_status_claim({}) is None
    for bad in (
        "x",
        {},
        {"status_list": "x"},
        {"status_list": {"idx": 7}},
        {"status_list": {"uri": uri}},
        {"status_list": {"idx": -1, "uri": uri}},
        {"status_list": {"idx": True, "uri": uri}},
        {"status_list": {"idx": 1.0, "uri": uri}},
        {"status_list": {"idx": 1, "uri": ""}},
        {"status_list": {"idx": 1, "uri": 5}},
        {"status_list": {"idx": 1, "uri": "x" * 3000}},
    ):
        with pytest.raises(TokenRejected, match="invalid status claim"):
            parse_status_claim({"status": bad})


def test_a_million_entries_at_one_percent_revoked() -> None:
    """The size figures of the list itself; the wire and the verifier are measured elsewhere."""
    size = 1_000_000
    revoked = random.Random(1).sample(range(size), size // 100)
    status_list = StatusList.build(size, revoked)
    lst = status_list.to_json()["lst"]
    assert isinstance(lst, str)
    print(
        f"\n1,000,000 entries, 1 % revoked at random: {len(status_list.data):,} bytes raw, "
        f"lst {len(lst):,} characters"
    )
    assert len(lst) < 20_000
    tracemalloc.start()
    try:
        decoded = StatusList.from_json({"bits": 1, "lst": lst})
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(decoded.get(i) == 1 for i in revoked[:1000])
    print(f"decoded and held: {held:,} bytes")
    assert held < 200_000

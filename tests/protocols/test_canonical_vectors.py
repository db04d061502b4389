"""Canonical bytes and CIDs pinned by vectors computed independently of the code under test.

The expected bytes below were written by hand from the msgpack specification (fixmap 0x8N,
fixstr 0xa0+len, str8 0xd9, float64 0xcb, ...), and the expected CIDs are computed here with
`multiformats`, not with protocols.cid. If one of these fails, the change broke every key and
CID already shared between nodes: revert it.
"""

import json
import subprocess
import sys

import pytest
from multiformats import CID, multihash

from protocols.canonical import canonicalize, encode, request_bytes, response_bytes
from protocols.cid import cid_of, digest_of, is_fast_cid, request_key, sha256_hex
from protocols.errors import NotCanonical


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts))


def reference_cid(data: bytes) -> str:
    return str(CID("base32", 1, "raw", multihash.digest(data, "sha2-256")))


# fixstr helpers written out by hand: a5 "model", a6 "params", a6 "prompt", a4 "task", a1 "v"
MODEL, PARAMS, PROMPT, TASK, V = "a56d6f64656c", "a6706172616d73", "a670726f6d7074", "a47461736b", "a176"

VECTORS = [
    (
        "generate, no params",
        lambda: request_bytes(task="generate", model="echo", prompt="hi", params={}),
        h("85", MODEL, "a46563686f", PARAMS, "80", PROMPT, "a26869", TASK, "a867656e6572617465", V, "01"),
    ),
    (
        "generate, params sorted, float64, NFC prompt",
        lambda: request_bytes(task="generate", model="echo", prompt="cafe\u0301",
                              params={"temperature": 0.5, "max_tokens": 16}),
        h("85", MODEL, "a46563686f", PARAMS, "82",
          "aa6d61785f746f6b656e73", "10",            # "max_tokens": 16
          "ab74656d7065726174757265", "cb3fe0000000000000",  # "temperature": 0.5 as float64
          PROMPT, "a5636166c3a9",                   # "café" (NFC: c3 a9)
          TASK, "a867656e6572617465", V, "01"),
    ),
    (
        "chat",
        lambda: request_bytes(task="chat", model="m", messages=[{"role": "user", "content": "hi"}], params={}),
        h("85", "a86d65737361676573", "91", "82", "a7636f6e74656e74", "a26869", "a4726f6c65", "a475736572",
          MODEL, "a16d", PARAMS, "80", TASK, "a463686174", V, "01"),
    ),
    (
        "response",
        lambda: response_bytes(task="generate", model="echo", text="echo: hi", finish_reason="stop",
                               usage={"prompt_tokens": 1, "completion_tokens": 2}),
        h("86", "ad66696e6973685f726561736f6e", "a473746f70",  # "finish_reason": "stop"
          MODEL, "a46563686f", TASK, "a867656e6572617465",
          "a474657874", "a86563686f3a206869",                    # "text": "echo: hi"
          "a57573616765", "82",
          "b1636f6d706c6574696f6e5f746f6b656e73", "02",          # "completion_tokens": 2 (fixstr len 17)
          "ad70726f6d70745f746f6b656e73", "01",                  # "prompt_tokens": 1
          V, "01"),
    ),
]


@pytest.mark.parametrize("name,make,expected", VECTORS, ids=[v[0] for v in VECTORS])
def test_canonical_bytes_match_hand_written_vectors(name, make, expected):
    assert make() == expected


@pytest.mark.parametrize("name,make,expected", VECTORS, ids=[v[0] for v in VECTORS])
def test_fast_cid_equals_multiformats(name, make, expected):
    assert cid_of(expected) == reference_cid(expected)
    assert request_key(expected, "cid") == reference_cid(expected)
    assert request_key(expected, "sha256") == sha256_hex(expected) == multihash.digest(expected, "sha2-256")[2:].hex()
    assert digest_of(cid_of(expected)) == multihash.digest(expected, "sha2-256")[2:]


def test_fast_cid_equals_multiformats_for_many_sizes():
    for n in (0, 1, 31, 32, 33, 1000, 65536):
        data = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        assert cid_of(data) == reference_cid(data)


def test_digest_of_rejects_other_forms():
    good = cid_of(b"x")
    for bad in (good.upper(), "z" + good[1:], good[:-1], good + "a", reference_cid(b"x").replace("bafk", "bafy")):
        assert not is_fast_cid(bad)
    with pytest.raises(ValueError):
        request_key(b"x", "md5")


def test_canonical_rules():
    assert encode({"b": 1, "a": 2}) == encode({"a": 2, "b": 1})
    assert encode(-0.0) == encode(0.0) == h("cb0000000000000000")
    assert encode(1) == h("01") and encode(1.0) == h("cb3ff0000000000000")
    assert encode(True) == h("c3") and encode(None) == h("c0") and encode(b"\x00") == h("c40100")
    assert encode("e\u0301") == encode("\u00e9")
    assert encode((1, 2)) == encode([1, 2]) == h("920102")
    # keys sort by UTF-8 bytes: "B" (0x42) < "a" (0x61) < "é" (0xc3 0xa9)
    assert list(canonicalize({"é": 0, "a": 0, "B": 0})) == ["B", "a", "é"]


@pytest.mark.parametrize(
    "value,reason",
    [
        (float("nan"), "no canonical encoding"),
        (float("inf"), "no canonical encoding"),
        (2**64, "64-bit"),
        ({1: "x"}, "not a string"),
        ({"e\u0301": 1, "\u00e9": 2}, "duplicate key"),
        (object(), "no canonical encoding"),
    ],
)
def test_values_without_a_canonical_form_are_refused(value, reason):
    with pytest.raises(NotCanonical, match=reason):
        encode(value)


def test_nesting_is_bounded():
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(NotCanonical, match="deeper"):
        encode(deep)


def test_request_keys_are_stable_across_processes():
    code = (
        "import json, node\n"
        "r = [node.complete(p, provider='echo', **kw).key for p, kw in "
        "[('hi', {}), ('hi', {'max_tokens': 5}), ([{'role': 'user', 'content': 'hi'}], {})]]\n"
        "print(json.dumps(r))"
    )
    keys = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      timeout=60, check=True).stdout) for _ in range(2)]
    expected = [
        reference_cid(request_bytes(task="generate", model="echo", prompt="hi", params={})),
        reference_cid(request_bytes(task="generate", model="echo", prompt="hi", params={"max_tokens": 5})),
        reference_cid(request_bytes(task="chat", model="echo", messages=[{"role": "user", "content": "hi"}],
                                    params={})),
    ]
    assert keys[0] == keys[1] == expected


@pytest.mark.parametrize("leaf", ["text", "é", 7, None, 1.5, [1]])
def test_nesting_is_bounded_whatever_the_leaf_and_the_keys(leaf):
    from protocols.canonical import MAX_DEPTH

    def nested(levels: int, key: str) -> object:
        value: object = leaf
        for _ in range(levels):
            value = {key: value}
        return value

    for key in ("k", "ké"):  # ASCII keys take a faster path than others: the same bound on both
        if not isinstance(leaf, list):
            assert canonicalize(nested(MAX_DEPTH, key)) is not None
        with pytest.raises(NotCanonical, match="nested deeper"):
            canonicalize(nested(MAX_DEPTH + 1, key))

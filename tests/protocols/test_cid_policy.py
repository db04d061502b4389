"""CIDs from peers: allowlisted hashes only, long enough digests, no identity hash; verify() by hashing."""

import pytest
from multiformats import CID, multihash

from protocols.cid import ALLOWED_HASHES, MIN_DIGEST_BYTES, cid_of, parse, verify
from protocols.errors import CIDMismatch, InsecureHash, MalformedMessage


def make(data: bytes, hash_name: str, codec: str = "raw", base: str = "base32") -> str:
    return str(CID(base, 1, codec, multihash.digest(data, hash_name)))


def test_our_fast_form_parses_without_multiformats():
    parsed = parse(cid_of(b"abc"))
    assert (parsed.version, parsed.codec, parsed.hash_name, len(parsed.digest)) == (1, "raw", "sha2-256", 32)


@pytest.mark.parametrize("hash_name", sorted(ALLOWED_HASHES))
def test_every_allowed_hash_verifies(hash_name):
    cid = make(b"payload", hash_name)
    assert parse(cid).hash_name == hash_name
    verify(cid, b"payload")
    with pytest.raises(CIDMismatch) as info:
        verify(cid, b"other payload")
    assert info.value.expected == cid and info.value.actual != cid


def test_other_bases_and_codecs_parse():
    verify(make(b"x", "sha2-256", base="base58btc"), b"x")
    assert parse(make(b"x", "sha2-256", codec="dag-cbor")).codec == "dag-cbor"


def test_identity_hash_is_insecure():
    with pytest.raises(InsecureHash, match="identity"):
        parse(make(b"secret data", "identity"))


@pytest.mark.parametrize("hash_name", ["sha1", "md5", "blake2s-256"])
def test_hashes_off_the_allowlist_are_insecure(hash_name):
    with pytest.raises(InsecureHash, match="not allowed"):
        parse(make(b"x", hash_name))


def test_short_digest_is_insecure_at_19_bytes_and_accepted_at_20():
    short = str(CID("base32", 1, "raw", multihash.wrap(b"\x01" * (MIN_DIGEST_BYTES - 1), "sha2-256")))
    with pytest.raises(InsecureHash, match="shorter"):
        parse(short)
    exact = str(CID("base32", 1, "raw", multihash.wrap(b"\x01" * MIN_DIGEST_BYTES, "sha2-256")))
    assert len(parse(exact).digest) == MIN_DIGEST_BYTES


@pytest.mark.parametrize("text", ["", "z", "b", "bafy", "Qm" + "1" * 44 + "!", "x" * 300, "bafkrei" + "!" * 52, 5])
def test_garbage_is_malformed(text):
    with pytest.raises(MalformedMessage):
        parse(text)


def test_mismatch_carries_both_cids():
    with pytest.raises(CIDMismatch) as info:
        verify(cid_of(b"a"), b"b")
    assert (info.value.expected, info.value.actual) == (cid_of(b"a"), cid_of(b"b"))


def test_a_hash_multiformats_cannot_load_is_malformed_not_a_crash():
    # Found by the fuzzer: multiformats imports keccak lazily and raises ImportError without pycryptodome.
    import base64

    raw = b"\x01\x55\x1b\x20" + b"\x07" * 32  # CIDv1, raw, keccak-256 (0x1b), 32-byte digest
    keccak = "b" + base64.b32encode(raw).decode().lower().rstrip("=")
    with pytest.raises((MalformedMessage, InsecureHash)):
        parse(keccak)


def truncated(data: bytes, hash_name: str, size: int = MIN_DIGEST_BYTES) -> str:
    """A CID whose multihash keeps the first `size` bytes of the digest (multihash truncation)."""
    return str(CID("base32", 1, "raw", multihash.digest(data, hash_name, size=size)))


def test_truncated_sha2_256_at_20_bytes_verifies_and_wrong_data_fails():
    cid = truncated(b"payload", "sha2-256")
    assert len(parse(cid).digest) == 20 and parse(cid).hash_name == "sha2-256"
    verify(cid, b"payload")
    with pytest.raises(CIDMismatch) as info:
        verify(cid, b"other payload")
    assert info.value.actual == truncated(b"other payload", "sha2-256")  # the same shape as the expected CID


@pytest.mark.parametrize("hash_name", sorted(ALLOWED_HASHES))
@pytest.mark.parametrize("size", [MIN_DIGEST_BYTES, MIN_DIGEST_BYTES + 1, 31])
def test_every_allowed_hash_verifies_when_truncated(hash_name, size):
    cid = truncated(b"payload", hash_name, size)
    verify(cid, b"payload")
    with pytest.raises(CIDMismatch):
        verify(cid, b"other payload")


@pytest.mark.parametrize("hash_name", ["sha2-256", "sha2-512"])
def test_a_truncated_digest_is_a_prefix_not_a_suffix(hash_name):
    full = multihash.unwrap(multihash.digest(b"payload", hash_name))
    suffix = str(CID("base32", 1, "raw", multihash.wrap(full[-MIN_DIGEST_BYTES:], hash_name)))
    with pytest.raises(CIDMismatch):
        verify(suffix, b"payload")

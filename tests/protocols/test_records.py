"""Identities, peer ids and signed records: every way a record can lie is caught."""

from __future__ import annotations

import dataclasses

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from protocols.codec import encode
from protocols.errors import BadSignature, ExpiredRecord, FrameTooLarge, MalformedMessage, StaleRecord
from protocols.records import (
    CLOCK_SKEW_MS,
    DOMAIN_ADVERT,
    DOMAIN_CACHE_RECORD,
    MAX_CACHE_RECORD_BYTES,
    CacheRecord,
    Identity,
    b58decode,
    b58encode,
    cache_dht_key,
    is_peer_id,
    peer_id_from_public_key,
    public_key_from_peer_id,
    select_cache_value,
    sign_cache_record,
    signed_payload,
    validate_cache_value,
    verify_cache_record,
)

NOW = 1_800_000_000_000  # ms
alice, bob, mallory = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
KEY = "bafkreihamvhhnhcz2nnqgsjqdb6pbn4kozgkkcwo3blythmbtgi3rhwkj4"
CID = "bafkreih5rfg5ctoqj4bkuyk6hcr2l5jnwlfr7k6ncf2btfjaaxzdsqgtfi"


def record(identity=alice, *, seq=1, created=NOW, ttl=3_600_000, key=KEY, cid=CID) -> CacheRecord:
    return sign_cache_record(identity, key=key, cid=cid, created=created, expires=created + ttl, seq=seq)


# -- identities and peer ids ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [bytes([i]) * 32 for i in (1, 2, 7, 255)] + [bytes(range(32))])
def test_peer_ids_equal_libp2p_for_the_same_keys(seed):
    ours = Identity.from_seed(seed)
    theirs = create_new_key_pair(seed)
    assert ours.peer_id == ID.from_pubkey(theirs.public_key).to_base58()
    assert ours.public_key == theirs.public_key.serialize()
    assert ours.to_protobuf() == theirs.private_key.serialize()
    assert ours.peer_id.startswith("12D3KooW")


def test_private_keys_round_trip_with_libp2p_in_both_forms():
    kp = create_new_key_pair(b"\x09" * 32)
    assert Identity.from_protobuf(kp.private_key.serialize()).peer_id == ID.from_pubkey(kp.public_key).to_base58()
    ours = Identity.from_seed(b"\x09" * 32)
    assert deserialize_private_key(ours.to_protobuf()).get_public_key().serialize() == ours.public_key
    go_style = bytes([0x08, 0x01, 0x12, 0x40]) + ours.seed + ours.public_bytes  # go-libp2p: seed || public
    assert Identity.from_protobuf(go_style).peer_id == ours.peer_id
    with pytest.raises(MalformedMessage, match="does not match"):
        Identity.from_protobuf(bytes([0x08, 0x01, 0x12, 0x40]) + ours.seed + bob.public_bytes)


def test_peer_id_inlines_the_public_key():
    assert public_key_from_peer_id(alice.peer_id) == alice.public_key
    assert peer_id_from_public_key(alice.public_key) == alice.peer_id
    assert is_peer_id(alice.peer_id) and not is_peer_id("12D3KooWnot-base58!") and not is_peer_id("Qm" + "a" * 44)


def test_base58_round_trip_with_leading_zeros():
    for data in (b"", b"\x00", b"\x00\x00\x01", bytes(range(40))):
        assert b58decode(b58encode(data)) == data
    with pytest.raises(MalformedMessage):
        b58decode("0OIl")


# -- signatures ---------------------------------------------------------------------------------


def test_a_signed_record_verifies():
    verify_cache_record(record(), NOW)


def test_forged_signer_is_refused():
    forged = dataclasses.replace(record(mallory), publisher=alice.peer_id)  # mallory claims to be alice
    with pytest.raises(BadSignature, match="signer is not the subject"):
        verify_cache_record(forged, NOW)
    stolen_key = dataclasses.replace(forged, public_key=alice.public_key)  # ... with alice's public key
    with pytest.raises(BadSignature, match="does not verify"):
        verify_cache_record(stolen_key, NOW)


@pytest.mark.parametrize("change", [{"cid": CID.replace("f", "g")}, {"seq": 2}, {"expires": NOW + 10**9},
                                    {"key": KEY[:-1] + "a"}, {"created": NOW - 1}])
def test_tampered_payload_is_refused(change):
    with pytest.raises(BadSignature):
        verify_cache_record(dataclasses.replace(record(), **change), NOW)


def test_unsigned_record_is_refused():
    with pytest.raises(BadSignature, match="unsigned"):
        verify_cache_record(dataclasses.replace(record(), signature=b""), NOW)


def test_signature_under_another_domain_prefix_is_refused():
    r = record()
    wrong = alice.sign(DOMAIN_ADVERT, r.signed_fields())  # a valid signature, for another record type
    with pytest.raises(BadSignature):
        verify_cache_record(dataclasses.replace(r, signature=wrong), NOW)
    assert signed_payload(DOMAIN_CACHE_RECORD, r.signed_fields()).startswith(DOMAIN_CACHE_RECORD)


def test_expired_record_is_refused_and_skew_is_tolerated_up_to_60_s():
    r = record(created=NOW - 7_200_000, ttl=3_600_000)  # expired an hour ago
    with pytest.raises(ExpiredRecord, match="expired"):
        verify_cache_record(r, NOW)
    expires = NOW - 1_000
    just = record(created=expires - 1000, ttl=1000)
    verify_cache_record(just, expires + 59_000)  # 59 s past expiry: within skew
    with pytest.raises(ExpiredRecord):
        verify_cache_record(just, expires + 61_000)  # 61 s past: refused
    future = record(created=NOW + 59_000)
    verify_cache_record(future, NOW)  # created 59 s ahead of our clock: skew
    with pytest.raises(ExpiredRecord, match="future"):
        verify_cache_record(record(created=NOW + 61_000), NOW)
    assert CLOCK_SKEW_MS == 60_000


def test_expiry_before_creation_is_refused():
    with pytest.raises(ExpiredRecord, match="before it was created"):
        verify_cache_record(record(ttl=0), NOW)


# -- the DHT validator and selector -------------------------------------------------------------


def test_validator_accepts_a_good_value_under_its_own_key():
    value = encode(record())
    assert validate_cache_value(cache_dht_key(KEY), value, NOW).cid == CID


def test_validator_refuses_a_value_under_another_key():
    with pytest.raises(MalformedMessage, match="stored under"):
        validate_cache_value(cache_dht_key("bafkreiother"), encode(record()), NOW)


def test_validator_size_limit_at_the_limit_and_one_past_it():
    value = encode(record())
    padded = value + b"\x00" * (MAX_CACHE_RECORD_BYTES - len(value))  # trailing bytes: undecodable
    with pytest.raises(MalformedMessage):
        validate_cache_value(cache_dht_key(KEY), padded, NOW)
    with pytest.raises(FrameTooLarge):
        validate_cache_value(cache_dht_key(KEY), padded + b"\x00", NOW)


def test_selector_compares_seq_within_one_publisher_and_created_across_publishers():
    dht_key = cache_dht_key(KEY)
    a1 = encode(record(alice, seq=1, created=NOW - 5000))
    a2 = encode(record(alice, seq=2, created=NOW - 9000))  # newer seq, older timestamp: still alice's best
    b1 = encode(record(bob, seq=50, created=NOW - 7000))
    forged = encode(dataclasses.replace(record(mallory, seq=99, created=NOW), publisher=alice.peer_id))
    assert select_cache_value(dht_key, [a1, a2], NOW) == 1
    assert select_cache_value(dht_key, [a1, a2, b1], NOW) == 2  # bob's newest (-7 s) beats alice's best (-9 s)
    assert select_cache_value(dht_key, [forged, a1], NOW) == 1  # invalid values never win
    assert select_cache_value(dht_key, [b"garbage"], NOW) == -1


def test_selector_breaks_ties_the_same_way_on_every_node():
    dht_key = cache_dht_key(KEY)
    a, b = encode(record(alice, created=NOW)), encode(record(bob, created=NOW))
    winner = min(alice.peer_id, bob.peer_id)
    for order in ([a, b], [b, a]):
        chosen = select_cache_value(dht_key, order, NOW)
        assert validate_cache_value(dht_key, order[chosen], NOW).publisher == winner


def test_replayed_older_sequence_is_stale():
    from protocols.advert.messages import check_newer

    assert StaleRecord.__mro__[1].__name__ == "RemoteProtocolError"
    check_newer(None, _advert(seq=5))
    check_newer(_advert(seq=5), _advert(seq=6))
    for seq in (5, 4):
        with pytest.raises(StaleRecord):
            check_newer(_advert(seq=5), _advert(seq=seq))


def _advert(seq: int):
    from tests.protocols.test_messages import make_advert

    return make_advert(alice, seq=seq)


def test_small_order_public_keys_are_refused():
    # With the identity-like key 00...00 an all-zero signature verifies for many messages.
    from protocols.records import _protobuf_key

    key = _protobuf_key(1, bytes(32))
    forged = dataclasses.replace(record(), publisher=peer_id_from_public_key(key), public_key=key,
                                 signature=bytes(64))
    with pytest.raises(BadSignature, match="small order"):
        verify_cache_record(forged, NOW)
    noncanonical = _protobuf_key(1, (2**255 - 19 + 1).to_bytes(32, "little"))
    with pytest.raises(BadSignature, match="canonically"):
        verify_cache_record(dataclasses.replace(forged, publisher=peer_id_from_public_key(noncanonical),
                                                public_key=noncanonical), NOW)


@pytest.mark.parametrize("change,field", [({"cid": "not-a-cid"}, "cid"), ({"key": "not-a-key"}, "key")])
def test_validator_refuses_records_whose_key_or_cid_is_not_one(change, field):
    bad = sign_cache_record(alice, **{"key": KEY, "cid": CID, "created": NOW, "expires": NOW + 1000, "seq": 1,
                                      **change})
    with pytest.raises(MalformedMessage) as info:
        validate_cache_value(cache_dht_key(bad.key), encode(bad), NOW)
    assert info.value.field == field


def test_sha256_strategy_keys_are_valid_request_keys():
    key = "ab" * 32
    good = sign_cache_record(alice, key=key, cid=CID, created=NOW, expires=NOW + 1000, seq=1)
    assert validate_cache_value(cache_dht_key(key), encode(good), NOW).key == key


def test_a_signed_field_unknown_to_this_version_verifies_and_an_unsigned_one_does_not():
    import msgpack

    from protocols.records import signed_payload

    fields = {**record().signed_fields(), "added_in_1_1": "hello"}
    signature = alice.sign(DOMAIN_CACHE_RECORD, fields)
    value = msgpack.packb({**fields, "signature": signature}, use_bin_type=True)
    assert validate_cache_value(cache_dht_key(KEY), value, NOW).key == KEY
    smuggled = msgpack.packb({**record().to_dict(), "added_later": "x"}, use_bin_type=True)
    with pytest.raises(BadSignature):
        validate_cache_value(cache_dht_key(KEY), smuggled, NOW)
    assert signed_payload(b"d", {"b": 1, "a": "e\u0301"}) == b"d" + msgpack.packb({"a": "e\u0301", "b": 1})

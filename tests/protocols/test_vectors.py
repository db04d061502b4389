"""The wire code agrees, in both directions, with vectors computed without it (tests/vectors/generate.py).

Decoding a vector's bytes gives the message built from its JSON, and encoding that message
gives exactly the vector's bytes; every invalid vector is refused with the named error; keys,
peer ids and signatures equal the vectors' (and py-libp2p's). If one of these fails, either the
code changed the bytes every other peer expects (revert it) or the spec changed (change
generate.py and the SPEC.md together, and rerun it).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

import protocols.errors as errors
from protocols.advert import messages as advert
from protocols.cache import messages as cache
from protocols.canonical import decode_response, request_bytes, response_bytes
from protocols.cid import cid_of, request_key
from protocols.codec import Dict, List, Message, Nested, decode, encode
from protocols.control import messages as control
from protocols.framing import NEED_DATA, FrameDecoder, encode_frame
from protocols.inference import machine
from protocols.inference import messages as inference
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
    peer_id_from_public_key,
    public_key_from_peer_id,
    select_cache_value,
    sign_cache_record,
    signed_payload,
    validate_cache_value,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
GENERATOR = VECTORS / "generate.py"
FILES = ("advert.json", "inference.json", "cache.json", "control.json", "records.json")


def load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


DOCS = {name: load(name) for name in FILES}
RECORDS = DOCS["records.json"]
KEYS = {item["name"]: item for item in RECORDS["identities"]}
DOMAINS = {"advert": DOMAIN_ADVERT, "cache_record": DOMAIN_CACHE_RECORD}
INFER_LIMITS = machine._LIMITS  # what the inference state machine decodes with, not a copy that can drift

# Who decodes what: a frame from the client is read by the server, and the other way round.
DECODERS = {
    "advert.json": {
        "client": lambda p: decode(p, advert.GetAdvert),
        "server": lambda p: advert.decode_advert(p)[0],
    },
    "inference.json": {
        "client": lambda p: decode(p, inference.CLIENT_MESSAGES, INFER_LIMITS),
        "server": lambda p: decode(p, inference.SERVER_MESSAGES, INFER_LIMITS),
    },
    "cache.json": {
        "client": lambda p: decode(p, cache.Get),
        "server": lambda p: decode(p, (cache.Found, cache.NotFound)),
    },
    "control.json": {  # `generate` sends an inference Request and gets inference messages back
        "client": lambda p: decode(p, (control.Command, inference.Request)),
        "server": lambda p: decode(p, (control.Reply, inference.Chunk, inference.Result, inference.Error)),
    },
}
MAX_FRAME = {
    "advert.json": advert.MAX_ADVERT_BYTES,
    "inference.json": machine.MAX_FRAME_SIZE,
    "cache.json": cache.MAX_FRAME_SIZE,
    "control.json": control.MAX_FRAME_SIZE,
}
PROTOCOL_IDS = {
    "advert.json": advert.PROTOCOL_ID,
    "inference.json": inference.PROTOCOL_ID,
    "cache.json": cache.PROTOCOL_ID,
    "control.json": control.PROTOCOL_ID,
}
TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (advert.GetAdvert, advert.Advert, *inference.CLIENT_MESSAGES, *inference.SERVER_MESSAGES,
                cache.Get, cache.Found, cache.NotFound, control.Command, control.Reply, CacheRecord)
}


# -- building expected values from JSON (never through the decoder under test) ----------------------


def plain(value: Any) -> Any:
    """JSON -> Python: {"$bytes": hex} -> bytes, recursively."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def build(cls: type[Message], wire: dict[str, Any]) -> Message:
    """The message object a wire map stands for, made with the dataclass constructor."""
    kwargs = {f.name: convert(f.metadata["spec"], wire[f.name]) for f in dataclasses.fields(cls)
              if f.name in wire}
    return cls(**kwargs)


def convert(spec: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(spec, Nested):
        return build(spec.cls, value)
    if isinstance(spec, List):
        return tuple(convert(spec.item, v) for v in value)
    if isinstance(spec, Dict):
        return {k: convert(spec.value, v) for k, v in value.items()}
    return plain(value)


def message_of(wire: dict[str, Any]) -> Message:
    assert wire["v"] == 1
    return build(TYPES[wire["t"]], wire)


def raises_exactly(name: str, fn: Any, *args: Any) -> errors.ProtocolError:
    """Run fn(*args); it must raise the error class called `name` (not a subclass, not a parent)."""
    with pytest.raises(errors.ProtocolError) as info:
        fn(*args)
    assert type(info.value).__name__ == name, f"raised {type(info.value).__name__}: {info.value}"
    return info.value


def unframe(file: str, data: bytes) -> bytes:
    decoder = FrameDecoder(MAX_FRAME[file])
    decoder.receive_data(data)
    payload = decoder.next_frame()
    assert isinstance(payload, bytes)
    assert decoder.pending == 0 and decoder.next_frame() is NEED_DATA
    return payload


def cases(section: str, files: tuple[str, ...] = tuple(DECODERS)) -> list[Any]:
    return [pytest.param(file, item, id=f"{file}: {item['name']}")
            for file in files for item in DOCS[file].get(section, [])]


# -- constants ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", list(DECODERS))
def test_protocol_ids_and_frame_limits_are_the_specified_ones(file):
    doc = DOCS[file]
    assert PROTOCOL_IDS[file] == doc["protocol_id"]
    assert MAX_FRAME[file] == doc["max_frame_size"]


def test_advert_topic_and_record_constants_are_the_specified_ones():
    assert advert.TOPIC == DOCS["advert.json"]["topic"]
    assert DOMAIN_ADVERT.hex() == RECORDS["domains"]["advert"]
    assert DOMAIN_CACHE_RECORD.hex() == RECORDS["domains"]["cache_record"]
    assert CLOCK_SKEW_MS == RECORDS["clock_skew_ms"]
    assert MAX_CACHE_RECORD_BYTES == RECORDS["max_cache_record_bytes"]
    assert cache.MAX_BLOCK_BYTES == DOCS["cache.json"]["max_block_bytes"]


# -- messages, both directions -----------------------------------------------------------------------


@pytest.mark.parametrize("file,item", cases("vectors"))
def test_decoding_the_vector_bytes_gives_the_vector_message(file, item):
    payload = unframe(file, bytes.fromhex(item["frame"]))
    assert payload.hex() == item["msgpack"]
    decoded = DECODERS[file][item["from"]](payload)
    assert decoded == message_of(item["message"])


@pytest.mark.parametrize("file,item", cases("vectors"))
def test_encoding_the_vector_message_gives_exactly_the_vector_bytes(file, item):
    message = message_of(item["message"])
    assert encode(message).hex() == item["msgpack"]
    assert encode_frame(encode(message), MAX_FRAME[file]).hex() == item["frame"]


@pytest.mark.parametrize("file,item", [c for c in cases("vectors") if "cid" in c.values[1]])
def test_the_cid_in_a_vector_is_the_cid_of_its_block(file, item):
    message = message_of(item["message"])
    block = message.response if isinstance(message, inference.Result) else message.data
    assert cid_of(block) == item["cid"] == message.cid
    if isinstance(message, inference.Result):
        assert message.verify()["text"] == "echo: hi"


@pytest.mark.parametrize("file,item", cases("decode_only"))
def test_decoders_accept_what_encoders_never_write(file, item):
    payload = unframe(file, bytes.fromhex(item["frame"]))
    decoded = DECODERS[file][item["from"]](payload)
    assert decoded == message_of(item["message"])
    assert encode(decoded).hex() == item["reencoded"]


@pytest.mark.parametrize("file,item", cases("invalid"))
def test_invalid_messages_are_refused_with_the_named_error(file, item):
    payload = unframe(file, bytes.fromhex(item["frame"]))
    raises_exactly(item["error"], DECODERS[file][item["from"]], payload)


@pytest.mark.parametrize("file,item", cases("invalid_frames"))
def test_invalid_frames_are_refused_with_the_named_error(file, item):
    decoder = FrameDecoder(MAX_FRAME[file])
    decoder.receive_data(bytes.fromhex(item["bytes"]))
    raises_exactly(item["error"], decoder.next_frame)


def test_a_frame_at_the_limit_is_accepted_and_one_over_is_refused():
    for file, limit in MAX_FRAME.items():
        decoder = FrameDecoder(limit)
        decoder.receive_data(_varint(limit))
        assert decoder.next_frame() is NEED_DATA  # the prefix is fine; the payload has not arrived
        assert DOCS[file]["invalid_frames"][0]["bytes"] == _varint(limit + 1).hex()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def test_gossip_data_is_the_advert_without_a_length_prefix():
    for item in DOCS["advert.json"]["gossip"]:
        data = bytes.fromhex(item["data"])
        assert advert.decode_advert(data)[0] == message_of(item["message"])
        assert encode(message_of(item["message"])) == data


# -- the inference state machine ----------------------------------------------------------------------


@pytest.mark.parametrize("transcript", DOCS["inference.json"]["transcripts"], ids=lambda t: t["name"])
def test_inference_transcripts_between_two_state_machines(transcript):
    sides = {"client": machine.InferenceStream(machine.Role.CLIENT),
             "server": machine.InferenceStream(machine.Role.SERVER)}
    for step in transcript["steps"]:
        sender = sides[step["from"]]
        receiver = sides["server" if step["from"] == "client" else "client"]
        message, data = message_of(step["message"]), bytes.fromhex(step["frame"])
        if "error" in step:
            raises_exactly(step["sender_error"], sender.send, message)
            receiver.receive_data(data)
            raises_exactly(step["error"], receiver.next_event)
            return
        assert sender.send(message) == data
        receiver.receive_data(data)
        assert receiver.next_event() == message
        assert receiver.next_event() is NEED_DATA


@pytest.mark.parametrize("transcript", [t for t in DOCS["inference.json"]["transcripts"]
                                        if not any("error" in s for s in t["steps"])], ids=lambda t: t["name"])
def test_inference_transcripts_fed_one_byte_at_a_time(transcript):
    client = machine.InferenceStream(machine.Role.CLIENT)
    server = machine.InferenceStream(machine.Role.SERVER)
    for step in transcript["steps"]:
        receiver = server if step["from"] == "client" else client
        (client if receiver is server else server).send(message_of(step["message"]))
        events = []
        for byte in bytes.fromhex(step["frame"]):
            receiver.receive_data(bytes([byte]))
            event = receiver.next_event()
            if event is not NEED_DATA:
                events.append(event)
        assert events == [message_of(step["message"])]
    assert client.state is server.state is machine.State.DONE


# -- the cache protocol's receiver rule -----------------------------------------------------------------


@pytest.mark.parametrize("item", DOCS["cache.json"]["check_found"], ids=lambda i: i["name"])
def test_the_receiver_verifies_a_block_against_the_cid_it_asked_for(item):
    answer = DECODERS["cache.json"]["server"](unframe("cache.json", bytes.fromhex(item["answer"])))
    asked = cache.Get(cid=item["get"])
    if item["expect"] == "ok":
        assert cache.check_found(asked, answer) == answer.data
    elif item["expect"] == "none":
        assert cache.check_found(asked, answer) is None
    else:
        raises_exactly(item["expect"], cache.check_found, asked, answer)


# -- request keys and responses ------------------------------------------------------------------------


@pytest.mark.parametrize("item", DOCS["cache.json"]["canonical_requests"], ids=lambda i: i["name"])
def test_canonical_request_bytes_and_keys(item):
    from node.router import build_request

    data = bytes.fromhex(item["bytes"])
    params = plain(item["params"])
    if item["router"]:
        request = build_request(item["input"]["prompt"], model_name=item["input"]["model_name"],
                                kwargs=item["input"]["kwargs"])
        assert request.task == item["task"]
        assert request.params == params
        assert list(request.params) == list(params)  # keys in canonical order
        made = request_bytes(task=request.task, model=item["model_identity"], prompt=request.prompt,
                             messages=request.messages, params=request.params)
    else:
        made = request_bytes(task=item["task"], model=item["model_identity"], prompt=item["input"]["prompt"],
                             params=params)
    assert made == data
    assert request_key(data, "cid") == cid_of(data) == item["key_cid"]
    assert request_key(data, "sha256") == item["key_sha256"]
    assert cache_dht_key(item["key_cid"]) == item["dht_key"]


@pytest.mark.parametrize("item", [i for i in DOCS["cache.json"]["canonical_requests"] if i["echo"]],
                         ids=lambda i: i["name"])
def test_the_echo_provider_gives_the_vector_request_key_end_to_end(item):
    import node

    result = node.complete(item["input"]["prompt"], provider="echo", **item["input"]["kwargs"])
    assert result.key == item["key_cid"]


def test_the_echo_answer_to_hi_has_the_vector_response_cid():
    import node

    response = DOCS["cache.json"]["canonical_responses"][0]
    result = node.complete("hi", provider="echo")
    assert (result.cid, result.text) == (response["cid"], "echo: hi")


@pytest.mark.parametrize("item", DOCS["cache.json"]["canonical_responses"], ids=lambda i: i["name"])
def test_canonical_response_bytes_and_cids(item):
    data = bytes.fromhex(item["bytes"])
    assert response_bytes(**item["input"]) == data
    assert cid_of(data) == item["cid"]
    assert decode_response(data) == plain(item["canonical"])


@pytest.mark.parametrize("item", DOCS["cache.json"]["invalid_responses"], ids=lambda i: i["name"])
def test_response_bytes_not_in_canonical_form_are_refused(item):
    raises_exactly(item["error"], decode_response, bytes.fromhex(item["bytes"]))


# -- identities ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", RECORDS["identities"], ids=lambda k: k["name"])
def test_identities_from_seeds_match_the_vectors(key):
    identity = Identity.from_seed(bytes.fromhex(key["seed"]))
    assert identity.public_bytes.hex() == key["public_key_raw"]
    assert identity.public_key.hex() == key["public_key_protobuf"]
    assert identity.to_protobuf().hex() == key["private_key_protobuf"]
    assert identity.peer_id == key["peer_id"]
    assert peer_id_from_public_key(identity.public_key) == key["peer_id"]
    assert public_key_from_peer_id(key["peer_id"]).hex() == key["public_key_protobuf"]
    assert b58encode(bytes.fromhex(key["peer_id_multihash"])) == key["peer_id"]
    assert b58decode(key["peer_id"]).hex() == key["peer_id_multihash"]
    for form in ("private_key_protobuf", "private_key_protobuf_64"):
        assert Identity.from_protobuf(bytes.fromhex(key[form])).peer_id == key["peer_id"]


@pytest.mark.parametrize("key", RECORDS["identities"], ids=lambda k: k["name"])
def test_identities_match_py_libp2p(key):
    pair = create_new_key_pair(bytes.fromhex(key["seed"]))
    assert ID.from_pubkey(pair.public_key).to_base58() == key["peer_id"]
    assert pair.public_key.serialize().hex() == key["public_key_protobuf"]
    assert pair.private_key.serialize().hex() == key["private_key_protobuf"]


# -- signed adverts ------------------------------------------------------------------------------------


def _signature_checks(item: dict[str, Any], message: Any, reproduce: Any) -> None:
    identity = Identity.from_seed(bytes.fromhex(KEYS[item["signer"]]["seed"]))
    signed, signature = bytes.fromhex(item["signed_bytes"]), bytes.fromhex(item["signature"])
    if signature:  # the vector's signature is over its signed bytes, with the signer's key
        Ed25519PublicKey.from_public_bytes(identity.public_bytes).verify(signature, signed)
        assert create_new_key_pair(identity.seed).public_key.verify(signed, signature)
    if not item["tampered"]:
        assert signed_payload(DOMAINS[item["domain"]], message.signed_fields()) == signed
        if signature:
            assert identity.sign(DOMAINS[item["domain"]], message.signed_fields()) == signature
    if item["reproducible"]:
        assert reproduce(identity, message) == message


@pytest.mark.parametrize("item", RECORDS["adverts"], ids=lambda i: i["name"])
def test_signed_adverts_match_the_vectors(item):
    decoded = advert.decode_advert(bytes.fromhex(item["msgpack"]))[0]
    assert decoded == message_of(item["message"])
    assert unframe("advert.json", bytes.fromhex(item["frame"])).hex() == item["msgpack"]
    if "x-future-field" not in item["message"]:
        assert encode(decoded).hex() == item["msgpack"]

    def reproduce(identity: Identity, message: advert.Advert) -> advert.Advert:
        fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)
                  if f.name not in ("peer_id", "public_key", "signature")}
        return advert.sign_advert(identity, **fields)

    _signature_checks(item, decoded, reproduce)


@pytest.mark.parametrize("item,check", [pytest.param(i, c, id=f"{i['name']} @ {c['now_ms']}: {c['expect']}")
                                        for i in RECORDS["adverts"] for c in i["checks"]])
def test_advert_verification_accepts_or_refuses_as_the_vector_says(item, check):
    data = bytes.fromhex(item["msgpack"])
    if check["expect"] == "ok":
        advert.verified_advert(data, check["now_ms"])
    else:
        raises_exactly(check["expect"], advert.verified_advert, data, check["now_ms"])


@pytest.mark.parametrize("item", RECORDS["replay"], ids=lambda i: i["name"])
def test_replayed_adverts_are_stale(item):
    current = advert.decode_advert(bytes.fromhex(item["current"]))[0] if item["current"] else None
    new = advert.decode_advert(bytes.fromhex(item["new"]))[0]
    if item["expect"] == "ok":
        advert.check_newer(current, new)
    else:
        raises_exactly(item["expect"], advert.check_newer, current, new)


# -- signed cache records ------------------------------------------------------------------------------


@pytest.mark.parametrize("item", RECORDS["cache_records"], ids=lambda i: i["name"])
def test_cache_records_match_the_vectors(item):
    value = bytes.fromhex(item["value"])
    assert len(value) == item["size"]
    if item["size"] > MAX_CACHE_RECORD_BYTES or item["message"]["v"] != 1:
        return  # never decoded: refused before (size) or by (version) the decoder, see the next test
    decoded = decode(value, CacheRecord)
    assert decoded == message_of(item["message"])
    if "pad" not in item["message"]:
        assert encode(decoded) == value

    def reproduce(identity: Identity, record: CacheRecord) -> CacheRecord:
        return sign_cache_record(identity, key=record.key, cid=record.cid, created=record.created,
                                 expires=record.expires, seq=record.seq)

    _signature_checks(item, decoded, reproduce)


@pytest.mark.parametrize("item,check", [pytest.param(i, c, id=f"{i['name']} @ {c['now_ms']}: {c['expect']}")
                                        for i in RECORDS["cache_records"] for c in i["checks"]])
def test_the_dht_validator_accepts_or_refuses_as_the_vector_says(item, check):
    value = bytes.fromhex(item["value"])
    if check["expect"] == "ok":
        record = validate_cache_value(item["dht_key"], value, check["now_ms"])
        assert record == message_of(item["message"])
    else:
        raises_exactly(check["expect"], validate_cache_value, item["dht_key"], value, check["now_ms"])


@pytest.mark.parametrize("item", RECORDS["selection"], ids=lambda i: i["name"])
def test_the_dht_selector_picks_the_vector_index(item):
    values = [bytes.fromhex(v) for v in item["values"]]
    assert select_cache_value(item["dht_key"], values, item["now_ms"]) == item["expect"]


# -- the generator -------------------------------------------------------------------------------------


def test_generate_py_reproduces_the_committed_json_byte_for_byte_without_the_code_under_test(tmp_path):
    out = tmp_path / "out"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['generate.py', '--out', {str(out)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(GENERATOR)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('protocols', 'node', 'libp2p')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, check=True)
    assert run.stdout.strip() == "[]", f"generate.py imported the code under test: {run.stdout}"
    for name in FILES:
        assert (out / name).read_bytes() == (VECTORS / name).read_bytes(), f"{name} differs from a fresh run"


# -- the specs' worked examples ------------------------------------------------------------------------

SPECS = sorted((Path(__file__).resolve().parents[2] / "protocols").glob("*/SPEC.md"))


def _all_vector_strings() -> str:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for doc in DOCS.values():
        walk(doc)
    return "\n".join(found)


def _spec_hex(text: str) -> list[str]:
    """Every long hex string in a spec: runs of hex-only lines in code blocks, and `inline` ones."""
    import re

    out, run = [], []
    for line in text.splitlines():
        if re.fullmatch(r"[0-9a-f]{32,}", line.strip()):
            run.append(line.strip())
            continue
        if run:
            out.append("".join(run))
            run = []
    out += re.findall(r"`([0-9a-f]{32,})`", text)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.parent.name)
def test_the_hex_in_each_spec_is_taken_from_the_vectors(spec):
    vectors = _all_vector_strings()
    examples = _spec_hex(spec.read_text(encoding="utf-8"))
    assert examples, "every SPEC.md has a worked example"
    missing = [h for h in examples if h not in vectors]
    assert missing == [], f"{spec}: hex not found in tests/vectors/*.json: {missing}"

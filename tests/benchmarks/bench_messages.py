"""Protocol messages and signed records: sign and verify rates, encode/decode against bare msgpack.

Every wire message is in the ratio table (each protocol's messages and the cache record); encode
includes checking every field against its spec (`protocols.codec.encode`)."""

from __future__ import annotations

import dataclasses

import msgpack

from protocols.advert.messages import Advert, decode_advert, encode_advert, verified_advert
from protocols.cache.messages import Found, Get, NotFound
from protocols.canonical import response_bytes
from protocols.cid import cid_of
from protocols.codec import decode, encode
from protocols.control.messages import Command, ErrorInfo, Reply
from protocols.inference.messages import Chunk, Credit, Error, Request, Result
from protocols.records import CacheRecord, Identity, sign_cache_record, verify_cache_record
from tests.benchmarks.bench_wire import rate
from tests.benchmarks.run import Section
from tests.protocols.test_messages import make_advert

TITLE = "Protocol messages and signed records (issue 5)"
NOW = 1_800_000_000_000


def run() -> Section:
    alice = Identity.from_seed(b"\x01" * 32)
    advert = make_advert(alice, created=NOW)
    record = sign_cache_record(alice, key=cid_of(b"k"), cid=cid_of(b"r"), created=NOW, expires=NOW + 1000, seq=1)
    fields = {k: getattr(advert, k) for k in (f.name for f in dataclasses.fields(Advert)) if k != "signature"}
    fields.pop("peer_id"), fields.pop("public_key")

    from protocols.advert.messages import sign_advert

    sign_rows = [
        ("advert", rate(lambda: sign_advert(alice, **fields)), rate(lambda: verified_advert(encode(advert), NOW))),
        ("cache record", rate(lambda: sign_cache_record(alice, key=record.key, cid=record.cid, created=NOW,
                                                        expires=NOW + 1000, seq=2)),
         rate(lambda: verify_cache_record(record, NOW))),
    ]
    data = response_bytes(task="generate", model="echo", text="echo: " + "word " * 100)
    messages = [
        ("advert", advert, Advert),
        ("request", Request(id="r" * 32, task="generate", timeout_ms=120_000, prompt="Explain CIDs. " * 8,
                            params={"temperature": 0.0, "max_tokens": 128}), Request),
        ("chunk", Chunk(17, " word"), Chunk),
        ("result", Result(response=data, cid=cid_of(data), key=cid_of(b"k"), provider="echo", peer=alice.peer_id,
                          cache="miss", timings={"total": 3.2}), Result),
        ("credit", Credit(16), Credit),
        ("error", Error(code="busy", message="every slot and the queue are full", retryable=True, retry_after=1.5),
         Error),
        ("cache get", Get(cid_of(data)), Get),
        ("cache found", Found(cid_of(data), data), Found),
        ("cache not-found", NotFound(cid_of(data)), NotFound),
        ("control command", Command("cache-get", {"cid": cid_of(data)}), Command),
        ("control reply", Reply(True, {"peer_id": alice.peer_id, "pid": 4242, "uptime_s": 12.5, "version": "0.1.0",
                                       "addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{alice.peer_id}"], "http_url": None}),
         Reply),
        ("control reply (error)", Reply(False, error=ErrorInfo("failed", f"{cid_of(data)} is not in the local store")),
         Reply),
        ("cache record", record, CacheRecord),
    ]
    codec_rows = []
    for name, message, cls in messages:
        raw = encode(message)
        plain = message.to_dict()
        enc, bare_enc = rate(lambda: encode(message)), rate(lambda: msgpack.packb(plain, use_bin_type=True))
        dec = rate(lambda: decode(raw, cls)) if cls is not Advert else rate(lambda: decode_advert(raw))
        bare_dec = rate(lambda: msgpack.unpackb(raw, raw=False))
        codec_rows.append((name, len(raw), enc, enc / bare_enc, dec, dec / bare_dec))
    assert encode_advert(advert) == encode(advert)
    lines = [
        "Ed25519 via `cryptography`, one core, best of 3. Verify = signer check + signature + time window.",
        "",
        "| record | sign /s | verify /s |",
        "|---|---|---|",
        *(f"| {n} | {s:,.0f} | {v:,.0f} |" for n, s, v in sign_rows),
        "",
        "| message | bytes | encode /s | vs msgpack | decode + validate /s | vs msgpack |",
        "|---|---|---|---|---|---|",
        *(f"| {n} | {b} | {e:,.0f} | {er:.2f} | {d:,.0f} | {dr:.2f} |" for n, b, e, er, d, dr in codec_rows),
    ]
    samples = [{"record": n, "sign_per_s": s, "verify_per_s": v} for n, s, v in sign_rows]
    samples += [{"message": n, "bytes": b, "encode_per_s": e, "encode_ratio": er, "decode_per_s": d,
                 "decode_ratio": dr} for n, b, e, er, d, dr in codec_rows]
    return Section("\n".join(lines), samples, sample_count=len(samples))

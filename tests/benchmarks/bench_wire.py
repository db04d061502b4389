"""Wire foundation: codec vs bare msgpack, framing throughput, CID fast path vs multiformats."""

from __future__ import annotations

import dataclasses
import statistics
import time

import msgpack
from multiformats import CID, multihash

from protocols.cid import cid_of
from protocols.codec import Dict, Float, Int, List, Message, Str, decode, encode, field
from protocols.framing import NEED_DATA, FrameDecoder, encode_frame
from tests.benchmarks.run import Section

TITLE = "Wire foundation (issue 4)"


@dataclasses.dataclass(frozen=True)
class Typical(Message):
    """Shaped like an inference request: strings, numbers, a small parameter map, a list."""

    TYPE = "typical"
    id: str = field(Str(max_len=64))
    model: str = field(Str(max_len=256))
    prompt: str = field(Str(max_len=1 << 20))
    params: dict = field(Dict(Float(), max_items=32))
    deadline: float = field(Float(0, 1e12))
    hops: int = field(Int(0, 8))
    peers: tuple = field(List(Str(max_len=128), max_items=16))


def rate(fn, seconds: float = 1.0) -> float:
    """Calls per second of `fn`, best of 3 runs of about `seconds`."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            for _ in range(100):
                fn()
            n += 100
        best = max(best, n / (time.perf_counter() - start))
    return best


def run() -> Section:
    msg = Typical("a" * 32, "hf_local/qwen2.5-0.5b", "Explain content addressing in two sentences. " * 4,
                  {"temperature": 0.0, "max_tokens": 128.0}, 1.7e9, 0, ("12D3KooW" + "x" * 44,))
    data = encode(msg)
    plain = msg.to_dict()
    rows = []
    enc, raw_enc = rate(lambda: encode(msg)), rate(lambda: msgpack.packb(plain, use_bin_type=True))
    dec, raw_dec = rate(lambda: decode(data, Typical)), rate(lambda: msgpack.unpackb(data, raw=False))
    rows.append(("encode", enc, raw_enc))
    rows.append(("decode + validate", dec, raw_dec))

    payload = b"x" * 1000
    stream = encode_frame(payload) * 4096  # ~4 MB of 1 kB frames
    throughput = []
    for _ in range(5):
        decoder = FrameDecoder()
        start = time.perf_counter()
        for i in range(0, len(stream), 65536):  # as a socket delivers it: 64 KiB reads
            decoder.receive_data(stream[i : i + 65536])
            while decoder.next_frame() is not NEED_DATA:
                pass
        throughput.append(len(stream) / (time.perf_counter() - start) / 1e6)
    big = encode_frame(b"y" * (1 << 20)) * 8
    big_tp = []
    for _ in range(5):
        decoder = FrameDecoder()
        start = time.perf_counter()
        for i in range(0, len(big), 65536):
            decoder.receive_data(big[i : i + 65536])
            while decoder.next_frame() is not NEED_DATA:
                pass
        big_tp.append(len(big) / (time.perf_counter() - start) / 1e6)

    blob = b"z" * 2048
    fast = rate(lambda: cid_of(blob))
    slow = rate(lambda: str(CID("base32", 1, "raw", multihash.digest(blob, "sha2-256"))), seconds=0.5)

    lines = [
        f"A request-shaped message of {len(data)} bytes (`tests/benchmarks/bench_wire.py`), one core, best of 3.",
        "",
        "| operation | protocols.codec (msg/s) | bare msgpack (msg/s) | ratio |",
        "|---|---|---|---|",
        *(f"| {name} | {ours:,.0f} | {bare:,.0f} | {ours / bare:.2f} |" for name, ours, bare in rows),
        "",
        f"Framing decoder, 64 KiB reads: {statistics.median(throughput):.0f} MB/s with 1 kB frames, "
        f"{statistics.median(big_tp):.0f} MB/s with 1 MiB frames (median of 5).",
        "",
        f"CID of 2 KiB: fast path {fast:,.0f}/s ({1e6 / fast:.1f} us) vs `multiformats` {slow:,.0f}/s "
        f"({1e6 / slow:.1f} us): **{fast / slow:.0f}x**.",
    ]
    samples = [{"op": n, "ours_per_s": o, "msgpack_per_s": b} for n, o, b in rows]
    samples += [{"op": "framing_1k_MBps", "value": v} for v in throughput]
    samples += [{"op": "framing_1M_MBps", "value": v} for v in big_tp]
    samples += [{"op": "cid_fast_per_s", "value": fast}, {"op": "cid_multiformats_per_s", "value": slow}]
    return Section("\n".join(lines), samples, sample_count=len(samples))

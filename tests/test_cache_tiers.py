"""The memory tier and the local sqlite store: bounds at the limit and one past it, TTL, verify on read."""

import sqlite3
import threading

import pytest
import trio

from node.cache import LocalStore, MemoryCache, StoreError, TieredCache
from node.cache.store import SCHEMA_VERSION
from protocols.cid import cid_of


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def block(i: int, size: int = 10) -> tuple[bytes, str]:
    data = (b"%08d" % i).ljust(size, b".")
    return data, cid_of(data)


# -- memory tier ---------------------------------------------------------------------------


def test_memory_holds_exactly_max_entries_and_evicts_the_least_recently_used():
    cache = MemoryCache(max_entries=3, max_bytes=10_000, ttl=0)
    for i in range(3):
        cache.put(f"k{i}", *block(i))
    assert len(cache) == 3 and cache.statistics().evictions == 0  # at the limit
    assert cache.get("k0") is not None  # k0 is now the most recently used
    cache.put("k3", *block(3))  # one past the limit
    assert len(cache) == 3 and cache.statistics().evictions == 1
    assert cache.get("k1") is None and cache.get("k0") is not None


def test_memory_bytes_bound_at_the_limit_and_one_past_it():
    cache = MemoryCache(max_entries=100, max_bytes=30, ttl=0)
    for i in range(3):
        cache.put(f"k{i}", *block(i, 10))
    assert cache.statistics().bytes == 30 and len(cache) == 3  # exactly at the limit
    cache.put("k3", *block(3, 11))  # one byte past: the LRU entries go until it fits
    stats = cache.statistics()
    assert stats.bytes <= 30 and cache.get("k3") is not None and cache.get("k0") is None


def test_memory_entry_larger_than_the_whole_cache_is_not_stored():
    cache = MemoryCache(max_entries=10, max_bytes=10, ttl=0)
    assert cache.put("fits", *block(0, 10)) is True
    assert cache.put("too-big", *block(1, 11)) is False
    assert cache.get("fits") is not None and cache.get("too-big") is None


def test_memory_ttl_under_a_fake_clock():
    clock = FakeClock()
    cache = MemoryCache(max_entries=10, max_bytes=1000, ttl=60, clock=clock)
    cache.put("k", *block(0))
    clock.now += 59.999
    assert cache.get("k") is not None
    clock.now += 0.001  # exactly at expiry: gone
    assert cache.get("k") is None
    assert cache.statistics().expirations == 1 and len(cache) == 0


def test_memory_cache_repr_and_statistics():
    cache = MemoryCache(max_entries=2, max_bytes=100, ttl=5)
    cache.put("k", *block(0))
    cache.get("k"), cache.get("nope")
    s = cache.statistics()
    assert (s.entries, s.hits, s.misses) == (1, 1, 1)
    assert "1/2 entries" in repr(cache) and "hits=1" in repr(cache)


def test_memory_cache_is_thread_safe():
    cache = MemoryCache(max_entries=50, max_bytes=10**6, ttl=0)

    def work(t: int) -> None:
        for i in range(2000):
            cache.put(f"{t}-{i % 80}", *block(i))
            cache.get(f"{(t + 1) % 8}-{i % 80}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    s = cache.statistics()
    assert s.entries == 50 and s.bytes == sum(len(e.data) for e in cache._entries.values())


# -- local store ---------------------------------------------------------------------------


def test_store_round_trip_and_key_index(tmp_path):
    store = LocalStore(tmp_path / "s.sqlite")
    data, cid = block(1)
    store.put("key-a", data, cid)
    store.put("key-b", data, cid)  # two request keys, one block
    assert store.get("key-a").data == data and store.get("key-b").cid == cid
    assert store.get_block(cid) == data and store.has(cid)
    s = store.statistics()
    assert (s.blocks, s.keys, s.bytes) == (1, 2, len(data))
    assert store.delete(cid) and store.get("key-a") is None and store.statistics().keys == 0


def test_store_refuses_bytes_that_do_not_match_their_cid(tmp_path):
    store = LocalStore(tmp_path / "s.sqlite")
    with pytest.raises(ValueError, match="hash to"):
        store.put("k", b"abc", cid_of(b"abd"))


def test_store_size_cap_at_the_limit_and_one_past_it_evicts_lru(tmp_path):
    clock = FakeClock()
    store = LocalStore(tmp_path / "s.sqlite", max_bytes=30, clock=clock)
    for i in range(3):
        clock.now += 1
        store.put(f"k{i}", *block(i, 10))
    assert store.statistics().bytes == 30 and store.statistics().evictions == 0
    clock.now += 1
    assert store.get("k0") is not None  # touch k0: k1 is now the oldest
    clock.now += 1
    store.put("k3", *block(3, 10))
    s = store.statistics()
    assert s.bytes == 30 and s.evictions == 1 and store.get("k1") is None and store.get("k0") is not None


def test_store_verify_on_read_drops_a_corrupt_block(tmp_path):
    path = tmp_path / "s.sqlite"
    store = LocalStore(path)
    data, cid = block(7)
    store.put("k", data, cid)
    with sqlite3.connect(path) as db:  # bit rot, or someone editing the file
        db.execute("UPDATE blocks SET data = ? WHERE cid = ?", (b"tampered!!", cid))
    assert store.get("k") is None
    assert store.statistics().corrupt == 1 and not store.has(cid)


def test_store_verify_reports_and_removes_corrupt_blocks(tmp_path):
    path = tmp_path / "s.sqlite"
    store = LocalStore(path)
    good, bad = block(1), block(2)
    store.put("a", *good)
    store.put("b", *bad)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE blocks SET data = ? WHERE cid = ?", (b"x", bad[1]))
    report = store.verify()
    assert report.checked == 2 and report.corrupt == (bad[1],)
    assert store.has(good[1]) and not store.has(bad[1])


def test_store_schema_version_is_recorded_and_a_newer_file_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    store = LocalStore(path)
    assert store.schema_version == SCHEMA_VERSION
    store.close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this accelmesh"):
        LocalStore(path)


def test_store_migrates_an_empty_file_and_reopens_without_migrating_again(tmp_path):
    path = tmp_path / "s.sqlite"
    sqlite3.connect(path).close()  # version 0: an empty database
    store = LocalStore(path)
    store.put("k", *block(1))
    store.close()
    again = LocalStore(path)
    assert again.get("k") is not None and again.schema_version == SCHEMA_VERSION


def test_store_rejects_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable accelmesh store"):
        LocalStore(path)


def test_two_store_handles_on_one_file_see_each_others_writes(tmp_path):
    a, b = LocalStore(tmp_path / "s.sqlite"), LocalStore(tmp_path / "s.sqlite")
    a.put("k", *block(5))
    assert b.get("k") is not None


def test_tiered_cache_promotes_local_hits_into_memory(tmp_path):
    store = LocalStore(tmp_path / "s.sqlite")
    store.put("k", *block(1))
    tiered = TieredCache(MemoryCache(), store)
    assert tiered.lookup("k").tier == "local"
    assert tiered.lookup("k").tier == "memory"


# -- limits: what the tests above leave out --------------------------------------------------


async def test_memory_ttl_runs_on_trio_time_under_autojump_clock(autojump_clock):
    cache = MemoryCache(max_entries=10, max_bytes=1000, ttl=60, clock=trio.current_time)
    with trio.fail_after(300):
        cache.put("k", *block(0))
        written = trio.current_time()
        await trio.sleep(30)
        assert cache.get("k") is not None, "a read does not extend the TTL ..."
        await trio.sleep_until(written + 59.999)
        assert cache.get("k") is not None
        await trio.sleep_until(written + 60)
        assert cache.get("k") is None, "... gone at exactly ttl seconds after the write"
        assert cache.statistics().expirations == 1
        cache.put("k", *block(0))  # written again: a new TTL
        await trio.sleep(59.999)
        assert cache.get("k") is not None


def test_store_holds_a_block_of_exactly_max_bytes_and_refuses_one_byte_more_without_evicting(tmp_path):
    store = LocalStore(tmp_path / "s.sqlite", max_bytes=30)
    assert store.put("fits", *block(0, 30)) is True  # at the limit
    assert store.put("too-big", *block(1, 31)) is False  # one past it, on its own
    s = store.statistics()
    assert (s.blocks, s.keys, s.bytes, s.evictions) == (1, 1, 30, 0)
    assert store.get("fits") is not None and store.get("too-big") is None


def test_store_evicts_least_recently_used_first_until_a_new_block_fits_and_drops_their_keys(tmp_path):
    clock = FakeClock()
    store = LocalStore(tmp_path / "s.sqlite", max_bytes=40, clock=clock)
    for i in range(4):
        clock.now += 1
        store.put(f"k{i}", *block(i, 10))
        store.put(f"k{i}-again", *block(i, 10))  # a second request key for the same block
    for i in (2, 0):  # read: least recently used is now 1, then 3, then 2, then 0
        clock.now += 1
        assert store.get(f"k{i}") is not None
    clock.now += 1
    store.put("new", *block(9, 20))  # 60 bytes: the two least recently used go
    s = store.statistics()
    assert (s.blocks, s.keys, s.bytes, s.evictions) == (3, 5, 40, 2)
    assert [info.cid for info in store.list()] == [block(9, 20)[1], block(0)[1], block(2)[1]]
    assert all(store.get(k) is None for k in ("k1", "k1-again", "k3", "k3-again"))

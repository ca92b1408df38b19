"""SyntheticMap: stable, case-insensitive, bounded, never recycles an address in use."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from matchlock.net.synthetic import SyntheticMap, is_synthetic, normalize_name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stable_case_insensitive_and_reversible() -> None:
    m = SyntheticMap()
    a = m.address_for("API.Example.com.")
    assert a == m.address_for("api.example.com")
    assert a == "198.18.0.1"
    b = m.address_for("other.example.com")
    assert b != a
    assert m.name_for(a) == "api.example.com"
    assert m.name_for("198.18.9.9") is None
    assert m.name_for("10.0.0.1") is None
    assert m.name_for("not an address") is None
    assert len(m) == 2


def test_addresses_stay_in_range_and_skip_the_edges() -> None:
    net = ipaddress.IPv4Network("198.18.0.0/30")
    m = SyntheticMap(capacity=2, network=net)
    assert {m.address_for("a"), m.address_for("b")} == {"198.18.0.1", "198.18.0.2"}
    assert m.name_for("198.18.0.0") is None and m.name_for("198.18.0.3") is None
    with pytest.raises(ValueError):
        SyntheticMap(capacity=3, network=net)


def test_full_map_refuses_until_a_name_has_been_idle_long_enough() -> None:
    clock = Clock()
    m = SyntheticMap(capacity=2, idle_before_evict=600, clock=clock)
    a = m.address_for("a")
    clock.now += 10
    m.address_for("b")
    assert m.address_for("c") is None  # nothing idle for 600 s yet
    clock.now += 595
    m.address_for("b")  # a use: b is now the most recent
    assert m.address_for("c") is not None  # a (idle 605 s) is evicted
    assert a is not None and m.name_for(a) is None
    b = m.address_for("b")
    assert b is not None and m.name_for(b) == "b"


def test_lookups_by_address_count_as_use() -> None:
    clock = Clock()
    m = SyntheticMap(capacity=2, idle_before_evict=100, clock=clock)
    a = m.address_for("a")
    m.address_for("b")
    clock.now += 200
    assert a is not None and m.name_for(a) == "a"  # a is now the most recent
    assert m.address_for("c") is not None
    assert m.name_for(a) == "a"
    assert m.address_for("b") is None  # b was evicted; a and c were just used
    clock.now += 200
    assert m.address_for("b") is not None


def test_pinned_names_are_never_evicted() -> None:
    clock = Clock()
    m = SyntheticMap(capacity=1, idle_before_evict=1, clock=clock)
    a = m.address_for("a")
    assert a is not None and m.pin(a) == "a"
    clock.now += 10_000
    assert m.address_for("b") is None
    m.unpin(a)
    assert m.address_for("b") is None  # unpinning is a use: idle time starts again
    clock.now += 2
    assert m.address_for("b") is not None
    assert m.pin(a) is None  # no longer ours
    with pytest.raises(RuntimeError):
        m.unpin(m.address_for("b") or "")


def test_freed_addresses_are_reused_last() -> None:
    clock = Clock()
    net = ipaddress.IPv4Network("198.18.0.0/29")  # 6 usable addresses
    m = SyntheticMap(capacity=2, idle_before_evict=0, network=net, clock=clock)
    seen = []
    for i in range(8):
        clock.now += 1
        seen.append(m.address_for(f"n{i}"))
    # Fresh addresses first (.1-.6), then the oldest freed ones, in order.
    assert seen == [f"198.18.0.{i}" for i in (1, 2, 3, 4, 5, 6, 1, 2)]


def test_thread_safety() -> None:
    m = SyntheticMap()
    results: list[dict[str, str | None]] = []

    def work() -> None:
        results.append({f"h{i}.test": m.address_for(f"h{i}.test") for i in range(500)})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == results[0] for r in results)
    assert len(set(results[0].values())) == 500 == len(m)


def test_helpers() -> None:
    assert normalize_name("A.B.") == "a.b"
    assert is_synthetic("198.19.255.254") and not is_synthetic("198.20.0.1")
    assert not is_synthetic("::1")

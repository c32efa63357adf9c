"""Outlier ejection: failed connects eject an endpoint for a growing back-off; pools skip ejected
endpoints but never eject their last one; a success brings an endpoint back."""

from __future__ import annotations

from proxy.balancer import Pool
from proxy.model import Endpoint, Family
from proxy.outliers import Outliers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ep(ip: str) -> Endpoint:
    return Endpoint(ip, 8080, Family.V4)


A, B, C = ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")


def test_ejection_grows_with_each_failure_and_a_success_forgets() -> None:
    clock = Clock()
    out = Outliers(clock=clock, base=1.0, cap=4.0)
    out.failed(A)
    assert out.ejected(A) and not out.ejected(B)
    out.failed(A)  # a dial that started before the ejection: no longer sentence
    assert out.ejected_now() == [("10.0.0.1", 8080, 1.0)]
    clock.now += 1.0
    assert not out.ejected(A)  # served its time: eligible again
    out.failed(A)
    assert out.ejected_now() == [("10.0.0.1", 8080, 2.0)]  # doubled
    for _ in range(5):
        clock.now += 10
        out.failed(A)
    assert out.ejected_now() == [("10.0.0.1", 8080, 4.0)]  # capped
    out.succeeded(A)
    assert not out.ejected(A) and out.ejections == {}
    clock.now += 10
    out.failed(A)
    assert out.ejected_now() == [("10.0.0.1", 8080, 1.0)]  # back to the base after a success
    assert out.ejections_total == 8


def test_a_pool_skips_ejected_endpoints() -> None:
    clock = Clock()
    out = Outliers(clock=clock)
    pool = Pool((A, B, C), clock=clock, outliers=out)
    out.failed(B)
    picks = [pool.pick() for _ in range(6)]
    assert B not in picks and set(picks) == {A, C}
    clock.now += 1.0
    assert B in {pool.pick() for _ in range(3)}  # the ejection ran out


def test_the_last_endpoint_is_never_ejected() -> None:
    clock = Clock()
    out = Outliers(clock=clock)
    pool = Pool((A, B), clock=clock, outliers=out)
    out.failed(A)
    out.failed(B)
    assert {pool.pick() for _ in range(4)} == {A, B}  # all ejected: use them anyway
    # and a connection retrying past its failed endpoint still gets one
    assert pool.pick(exclude=[A]) == B


def test_affinity_moves_off_an_ejected_endpoint() -> None:
    clock = Clock()
    out = Outliers(clock=clock)
    pool = Pool((A, B), affinity_timeout=100, clock=clock, outliers=out)
    pinned = pool.pick("192.0.2.7")
    assert pool.pick("192.0.2.7") == pinned
    out.failed(pinned)
    moved = pool.pick("192.0.2.7")
    assert moved != pinned and pool.pick("192.0.2.7") == moved


def test_forget_drops_endpoints_no_pool_has() -> None:
    out = Outliers(clock=Clock())
    out.failed(A)
    out.failed(B)
    out.forget({("10.0.0.2", 8080)}.__contains__)
    assert list(out.ejections) == [("10.0.0.2", 8080)]

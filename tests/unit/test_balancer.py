"""balancer.Pool: round robin, its stability across syncs, ClientIP affinity, failover picks, and
least connections."""

from __future__ import annotations

import collections
import random

from proxy.balancer import Pool
from proxy.dataplane.traffic import Traffic
from proxy.model import Endpoint, Family, ServicePortName
from proxy.outliers import Outliers

E = [Endpoint(f"10.244.0.{i}", 8080, Family.V4) for i in range(1, 6)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(endpoints: tuple[Endpoint, ...], *, affinity: int = 0, clock: Clock | None = None, seed: int = 7) -> Pool:
    return Pool(endpoints, affinity_timeout=affinity, clock=clock or Clock(), rng=random.Random(seed))


def pick(p: Pool, client: str | None = None, exclude: list[Endpoint] | None = None) -> Endpoint:
    ep = p.pick(client, exclude or ())
    assert ep is not None
    return ep


def picks(p: Pool, n: int, client: str | None = None) -> list[Endpoint]:
    return [pick(p, client) for _ in range(n)]


# -- round robin -----------------------------------------------------------------------------------

def test_round_robin_covers_every_endpoint_equally() -> None:
    p = pool(tuple(E[:3]))
    got = picks(p, 300)
    assert collections.Counter(got) == {E[0]: 100, E[1]: 100, E[2]: 100}
    for i in range(0, 300, 3):  # every window of three is a permutation
        assert set(got[i:i + 3]) == set(E[:3])


def test_order_is_shuffled_per_pool() -> None:
    # Every node starting on the same endpoint would pile the first connections onto it.
    firsts = {pool(tuple(E), seed=s).pick() for s in range(30)}
    assert len(firsts) > 1


def test_same_set_keeps_order_and_cursor() -> None:
    p = pool(tuple(E[:3]))
    order = p.endpoints
    first_two = picks(p, 2)
    assert first_two == list(order[:2])
    p.update(tuple(reversed(E[:3])), 0)  # a resync delivers the same endpoints in another order
    assert p.endpoints == order
    assert p.pick() == order[2]


def test_changed_set_resets_the_cursor() -> None:
    p = pool(tuple(E[:3]))
    picks(p, 2)
    p.update(tuple(E[:4]), 0)
    assert set(p.endpoints) == set(E[:4])
    assert picks(p, 4) == list(p.endpoints)


def test_removed_endpoint_is_never_picked() -> None:
    p = pool(tuple(E[:3]))
    p.update((E[0], E[2]), 0)
    assert set(picks(p, 10)) == {E[0], E[2]}


def test_empty_pool_picks_none() -> None:
    assert Pool(clock=Clock()).pick() is None
    assert pool((), affinity=60).pick("192.0.2.1") is None
    p = pool(tuple(E[:2]))
    p.update((), 0)
    assert p.pick() is None


# -- exclude (failover) ----------------------------------------------------------------------------

def test_exclude_skips_failed_endpoints() -> None:
    p = pool(tuple(E[:3]))
    order = p.endpoints
    for _ in range(5):  # wherever the cursor is
        assert p.pick(exclude=[order[0], order[1]]) == order[2]


def test_everything_excluded_still_picks() -> None:
    # A retry ladder longer than the pool tries endpoints again rather than giving up early.
    p = pool(tuple(E[:2]))
    assert p.pick(exclude=list(E[:2])) in E[:2]


# -- affinity --------------------------------------------------------------------------------------

def test_no_affinity_without_timeout() -> None:
    p = pool(tuple(E[:2]))
    assert len(set(picks(p, 2, "192.0.2.1"))) == 2


def test_affinity_pins_a_client_until_timeout() -> None:
    clock = Clock()
    p = pool(tuple(E[:2]), affinity=10, clock=clock)
    first = p.pick("192.0.2.1")
    other = p.pick("192.0.2.2")
    assert other != first  # round robin goes on for other clients
    clock.now += 9.9
    assert p.pick("192.0.2.1") == first


def test_affinity_window_slides_with_use() -> None:
    clock = Clock()
    p = pool(tuple(E[:2]), affinity=10, clock=clock)
    first = p.pick("192.0.2.1")
    for _ in range(5):  # 45 s in all, never 10 s idle
        clock.now += 9
        assert p.pick("192.0.2.1") == first


def test_affinity_expires_after_timeout_idle() -> None:
    clock = Clock()
    p = pool(tuple(E[:2]), affinity=10, clock=clock)
    first = p.pick("192.0.2.1")  # cursor now on the other endpoint
    clock.now += 10
    assert p.pick("192.0.2.1") != first


def test_expire_affinity_sweeps_old_clients() -> None:
    clock = Clock()
    p = pool(tuple(E[:3]), affinity=10, clock=clock)
    p.pick("192.0.2.1")
    clock.now += 5
    p.pick("192.0.2.2")
    clock.now += 6
    p.expire_affinity()
    # The sweep bounds memory: only the client seen within the timeout is remembered.
    assert set(p._affinity) == {"192.0.2.2"}


def test_affinity_to_removed_endpoint_is_dropped() -> None:
    p = pool(tuple(E[:3]), affinity=60)
    first = p.pick("192.0.2.1")
    p.update(tuple(e for e in E[:3] if e != first), 60)
    assert p.pick("192.0.2.1") != first


def test_affinity_survives_an_unrelated_endpoint_change() -> None:
    p = pool(tuple(E[:3]), affinity=60)
    first = p.pick("192.0.2.1")
    p.update((*E[:3], E[3]), 60)
    assert all(p.pick("192.0.2.1") == first for _ in range(5))


def test_affinity_timeout_change_forgets_clients() -> None:
    p = pool(tuple(E[:2]), affinity=60)
    first = p.pick("192.0.2.1")
    p.update(tuple(E[:2]), 120)
    assert p.pick("192.0.2.1") != first  # cursor moved on; the old pin is gone


def test_exclude_bypasses_affinity() -> None:
    p = pool(tuple(E[:3]), affinity=60)
    first = pick(p, "192.0.2.1")
    assert p.pick("192.0.2.1", exclude=[first]) != first


def test_affinity_follows_failover() -> None:
    # roundrobin.go records the endpoint picked with sessionAffinityReset, so the next connection
    # from this client goes where the last one succeeded, not back to the endpoint that failed.
    p = pool(tuple(E[:3]), affinity=60)
    dead = pick(p, "192.0.2.1")
    survivor = pick(p, "192.0.2.1", [dead])
    assert p.pick("192.0.2.1") == survivor


# -- least connections ------------------------------------------------------------------------------


def least(endpoints: tuple[Endpoint, ...], open_: collections.Counter[Endpoint], **kw: object) -> Pool:
    p = pool(endpoints, **kw)  # type: ignore[arg-type]
    p.load = open_.__getitem__
    return p


def test_least_connections_picks_the_endpoint_with_fewest_open() -> None:
    open_: collections.Counter[Endpoint] = collections.Counter({E[0]: 3, E[1]: 1, E[2]: 2})
    p = least(tuple(E[:3]), open_)
    assert pick(p) == E[1]
    open_[E[1]] += 5  # it is now the busiest
    assert pick(p) == E[2]


def test_least_connections_ties_go_round_robin() -> None:
    open_: collections.Counter[Endpoint] = collections.Counter()
    p = least(tuple(E), open_)
    assert collections.Counter(picks(p, 50)) == {ep: 10 for ep in E}
    # As connections open (and are counted), every endpoint fills up evenly.
    for _ in range(20):
        open_[pick(p)] += 1
    assert set(open_.values()) == {4}


def test_least_connections_skips_failed_and_ejected_endpoints() -> None:
    open_: collections.Counter[Endpoint] = collections.Counter({E[0]: 0, E[1]: 5, E[2]: 9})
    clock = Clock()
    p = least(tuple(E[:3]), open_, clock=clock)
    assert pick(p, exclude=[E[0]]) == E[1]
    p.outliers = Outliers(clock=clock)
    p.outliers.failed(E[0])  # its connects fail: ejected for a while, however idle
    assert pick(p) == E[1]
    # Everything excluded: round robin still picks something rather than give up early.
    assert pick(p, exclude=list(E[:3])) in E[:3]


def test_least_connections_keeps_client_affinity() -> None:
    open_: collections.Counter[Endpoint] = collections.Counter()
    p = least(tuple(E[:3]), open_, affinity=60)
    first = pick(p, "192.0.2.1")
    open_[first] += 10
    assert pick(p, "192.0.2.1") == first  # pinned, however busy
    assert pick(p, "192.0.2.2") != first  # a new client goes elsewhere


def test_large_pools_compare_two_and_favour_the_idle() -> None:
    """Beyond LEAST_SCAN endpoints the pool compares two (the power of two choices): O(1) per pick,
    and a busy endpoint gets far fewer new connections than an idle one."""
    many = [Endpoint(f"10.244.1.{i}", 8080, Family.V4) for i in range(1, 41)]
    open_: collections.Counter[Endpoint] = collections.Counter({ep: 100 for ep in many[:20]})
    p = least(tuple(many), open_)
    calls = 0

    def counted(ep: Endpoint) -> int:
        nonlocal calls
        calls += 1
        return open_[ep]

    p.load = counted
    chosen = collections.Counter(pick(p) in many[:20] for _ in range(1000))
    assert calls <= 2 * 1000
    # An idle endpoint is chosen unless both candidates are busy: about 1/4 of the time.
    assert chosen[True] < 350 and chosen[False] > 650


def test_a_burst_of_dials_spreads_by_what_is_in_flight() -> None:
    """Dials in progress count (Traffic.load adds EndpointTraffic.dialing): a burst of accepts,
    none connected yet, spreads instead of all going to the endpoint least loaded before it."""
    traffic = Traffic()
    name = ServicePortName("ns", "web", "http", "TCP")
    p = pool(tuple(E[:2]))
    p.load = traffic.load(name)
    counts = traffic.service(name)
    for _ in range(3):
        counts.connected(E[0], 0.001)  # 3 open on E[0], none on E[1]
    burst = []
    for _ in range(9):
        ep = pick(p)
        counts.endpoint(ep).dialing += 1  # what the forwarders do while they dial
        burst.append(ep)
    assert collections.Counter(burst) == {E[1]: 6, E[0]: 3}  # 3 to even up, then alternating

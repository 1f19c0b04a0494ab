"""A model of dense decode's cluster protocol (branch dense-multicast), n = 2 or 4 CTAs, random
interleavings: each page's 9 column tiles reloaded per (buffer, warpgroup) set by the warpgroup
that reads them last, every CTA expecting the bytes on its own tile barriers, telling the others
(peer-read barriers, one per sender) and issuing its share by multicast into all; the seesaw's
order of waits, named barriers and releases; pieces with odd and empty block ranges; a cluster
barrier between split tiles.  Checks: no hang; S and P V read the block they should; no landing
over a tile a reader still holds.  It models the protocol as designed (session 18), not the
kernel's code: change both together.  Not collected by pytest; run ``python tests/model_dense_multicast.py
[N]`` (2000 interleavings pass; removing the peer-read wait, its phase flip or a wrong parity fails).
A shared peer-read barrier counting n - 1 arrivals also passes here, where arrivals land at once;
the kernel keeps one per sender, which does not rely on that."""
import random
import sys

TILES = 9
P_TILE = 8
V_L, V_R = (0, 1, 2, 3), (4, 5, 6, 7)
RELOAD = {(0, 0): V_L, (0, 1): V_R + (P_TILE,), (1, 0): V_L + (P_TILE,), (1, 1): V_R}  # (buffer, wg) -> tiles


class Bar:
    def __init__(self, count, name):
        self.count, self.pending, self.tx, self.phase, self.name = count, count, 0, 0, name

    def _check(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive_expect(self, nbytes=0):
        assert self.pending > 0, self.name
        self.tx += nbytes
        self.pending -= 1
        self._check()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        self._check()

    def done(self, parity):
        return self.phase % 2 != parity


class Named:
    def __init__(self, name):
        self.arrived, self.synced, self.name = 0, 0, name

    def arrive(self):
        assert self.arrived <= self.synced, f"{self.name}: arrived twice before a sync"
        self.arrived += 1

    def can_sync(self):
        return self.arrived > self.synced


class Cta:
    def __init__(self, rank, n):
        self.rank = rank
        self.full = {(b, t): Bar(1, f"full{b},{t}") for b in range(2) for t in range(TILES)}
        self.peer_read = {(b, w, s): Bar(1, f"peer_read{b},{w},{s}") for b in range(2) for w in range(2)
                          for s in range(n)}
        self.nb = {x: Named(x) for x in ("MAX_0", "MAX_1", "P_0", "P_1")}
        self.tile = {(b, t): None for b in range(2) for t in range(TILES)}  # block whose bytes are there
        self.holding = {(b, t): set() for b in range(2) for t in range(TILES)}  # readers
        self.sync_count = {"piece": [0, 0]}


def run(seed, n, work, steps=400000):
    """``work``: the split tiles, each a list of pieces (lo, hi), the same for every CTA."""
    rnd = random.Random(seed)
    ctas = [Cta(r, n) for r in range(n)]
    events = []
    now = [0]
    cluster_bar = {"arrived": 0, "gen": 0}
    piece_bar = [{"arrived": 0, "gen": 0} for _ in range(n)]

    def later(fn, lo=1, hi=30):
        events.append((now[0] + rnd.randint(lo, hi), fn))

    def land(b, t, blk):
        def fn():
            for c in ctas:
                assert not c.holding[(b, t)], (c.rank, b, t, "landing under a reader", c.holding[(b, t)])
                c.tile[(b, t)] = blk
                c.full[(b, t)].complete_tx(1)
        return fn

    def share(c, b, w, target, phase_box):
        """share_tiles: expect, tell the others, wait for them, issue this rank's share."""
        blk, ok = target
        if not ok:
            return
        tiles = RELOAD[(b, w)]
        for t in tiles:
            c.full[(b, t)].arrive_expect(1)
        for o in range(1, n):
            ctas[(c.rank + o) % n].peer_read[(b, w, c.rank)].arrive_expect()
        par = phase_box[b]
        for s in range(n):
            if s != c.rank:
                yield lambda s=s: c.peer_read[(b, w, s)].done(par)
        phase_box[b] ^= 1
        for i, t in enumerate(tiles):
            if (i + b) % n == c.rank:
                later(land(b, t, blk))

    def sync_barrier(box, parties):
        gen = box["gen"]
        box["arrived"] += 1
        if box["arrived"] == parties:
            box["arrived"] = 0
            box["gen"] += 1
        yield lambda: box["gen"] > gen

    def wait_tiles(c, b, par, blk, who):
        for t in range(TILES):
            yield lambda t=t: c.full[(b, t)].done(par)
            assert c.tile[(b, t)] == blk, (c.rank, who, "S reads", b, t, c.tile[(b, t)], blk)
            c.holding[(b, t)].add(who)

    def hold(c, b, tiles, blk, who):
        for t in tiles:
            assert c.tile[(b, t)] == blk, (c.rank, who, "reads", b, t, c.tile[(b, t)], blk)
            c.holding[(b, t)].add(who)

    def drop(c, b, tiles, who):
        for t in tiles:
            c.holding[(b, t)].discard(who)

    def consumer(c, w):
        peer_phase = [0, 0]
        phase = 0  # this warpgroup's buffer's tile-barrier phase
        who = f"wg{w}"
        for ti, pieces in enumerate(work):
            yield from sync_barrier(cluster_bar, 2 * n)  # hand_out
            prev_blocks = 0
            for pi, (lo, hi) in enumerate(pieces):
                nxt = pieces[pi + 1] if pi + 1 < len(pieces) else None
                if prev_blocks <= 0 or hi <= lo:
                    yield from share(c, 0, w, ((ti, pi, lo), lo < hi), peer_phase)
                    yield from share(c, 1, w, ((ti, pi, lo + 1), lo + 1 < hi), peer_phase)
                yield from sync_barrier(piece_bar[c.rank], 2)  # Q_RELOAD
                for a in range(lo, hi, 2):
                    if a + 2 < hi:
                        t0, t1 = ((ti, pi, a + 2), True), ((ti, pi, a + 3), a + 3 < hi)
                    else:
                        nlo, nhi = nxt if nxt else (0, 0)
                        ok = nxt is not None and nlo < nhi
                        t0, t1 = ((ti, pi + 1, nlo), ok), ((ti, pi + 1, nlo + 1), ok and nlo + 1 < nhi)
                    b0, b1 = (ti, pi, a), (ti, pi, a + 1)
                    lone = a + 1 >= hi
                    if w == 0:
                        yield from wait_tiles(c, 0, phase, b0, who)  # S0
                        drop(c, 0, range(TILES), who)
                        hold(c, 0, V_L, b0, who)  # P0 V0_L
                        c.nb["MAX_0"].arrive()
                        yield lambda: c.nb["MAX_1"].can_sync()
                        c.nb["MAX_1"].synced += 1
                        assert not (c.holding[(0, P_TILE)] - {who}), "P0 over a reader"
                        c.tile[(0, P_TILE)] = ("P0", b0)
                        c.nb["P_0"].arrive()
                        drop(c, 0, V_L, who)
                        yield from share(c, 0, 0, t0, peer_phase)
                        if lone:
                            yield from share(c, 1, 0, t1, peer_phase)
                        yield lambda: c.nb["P_1"].can_sync()
                        c.nb["P_1"].synced += 1
                        if not lone:
                            hold(c, 1, V_L, b1, who)
                            assert c.tile[(1, P_TILE)] == ("P1", b1)
                            c.holding[(1, P_TILE)].add(who)
                            drop(c, 1, V_L + (P_TILE,), who)
                            yield from share(c, 1, 0, t1, peer_phase)
                        phase ^= 1
                    else:
                        if not lone:
                            yield from wait_tiles(c, 1, phase, b1, who)  # S1
                            drop(c, 1, range(TILES), who)
                        yield lambda: c.nb["MAX_0"].can_sync()
                        c.nb["MAX_0"].synced += 1
                        c.nb["MAX_1"].arrive()
                        if not lone:
                            assert not (c.holding[(1, P_TILE)] - {who}), "P1 over a reader"
                            c.tile[(1, P_TILE)] = ("P1", b1)
                        c.nb["P_1"].arrive()
                        yield lambda: c.nb["P_0"].can_sync()
                        c.nb["P_0"].synced += 1
                        hold(c, 0, V_R, b0, who)
                        assert c.tile[(0, P_TILE)] == ("P0", b0)
                        drop(c, 0, V_R, who)
                        yield from share(c, 0, 1, t0, peer_phase)
                        if not lone:
                            hold(c, 1, V_R, b1, who)
                            drop(c, 1, V_R, who)
                        yield from share(c, 1, 1, t1, peer_phase)
                        if not lone:
                            phase ^= 1
                prev_blocks = hi - lo
                yield from sync_barrier(piece_bar[c.rank], 2)  # the epilogue's row-sum exchange
        yield from sync_barrier(cluster_bar, 2 * n)  # the final hand_out

    actors = [consumer(c, w) for c in ctas for w in range(2)]
    waiting = [None] * len(actors)
    alive = [True] * len(actors)
    for step in range(steps):
        runnable = [i for i in range(len(actors)) if alive[i] and (waiting[i] is None or waiting[i]())]
        if events and (not runnable or rnd.random() < 0.3):
            events.sort(key=lambda e: e[0])
            _, fn = events.pop(rnd.randrange(min(3, len(events))))
            fn()
            continue
        if not runnable:
            if not any(alive):
                return True
            raise AssertionError(f"hang: seed {seed}, n {n}, work {work}")
        i = rnd.choice(runnable)
        try:
            waiting[i] = next(actors[i])
        except StopIteration:
            alive[i] = False
        now[0] += 1
    raise AssertionError("too many steps")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for seed in range(count):
        rnd = random.Random(seed)
        work = []
        for _ in range(rnd.randint(1, 3)):
            pieces = []
            for _ in range(rnd.randint(1, 4)):
                lo = rnd.randint(0, 3)
                pieces.append((lo, lo + rnd.choice([0, 1, 2, 3, 4, 5])))
            work.append(pieces)
        run(seed, rnd.choice([2, 4]), work)
    print("ok", count, "interleavings")

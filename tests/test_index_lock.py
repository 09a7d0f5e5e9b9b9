"""The index's LOCK between real processes, on a local folder and on the S3 test server: of several runs that find
the same stale lock exactly one takes it over; a lock held past its ttl is renewed, not taken over; a run that lost
its lock neither publishes nor collects garbage."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

from roiqa.index import store
from roiqa.io import uri as uri_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = 4  # processes


@dataclass(frozen=True)
class Race:
    """How the contenders race on one kind of store."""

    rounds: int
    locks: int  # stale locks contended for at once in a round, one thread per lock in each process
    spreads: tuple[float, ...]  # seconds over which the contenders' tries of one lock are spread (cycled over locks)


RACES = {
    "local": Race(rounds=3, locks=10, spreads=(0.0, 0.001, 0.003, 0.01)),
    "s3": Race(rounds=3, locks=4, spreads=(0.0, 0.01, 0.03, 0.1)),  # a request takes 10-50 ms
}

# One contender process. Per line of JSON {roots, ttl, starts}, one thread per root tries to take that root's lock at
# its start time; winners keep their locks. {"release": true}: each winner checks that it still holds its lock and
# releases it. {"warm": root}: the store's client connects.
_CONTENDER = """
import json, sys, threading, time
from roiqa.index import store
held = {}
print("ready", flush=True)

def contend(root, ttl, start, out):
    time.sleep(max(0.0, start - time.time()))
    lock = store.IndexLock(root, ttl, "contender")
    try:
        lock.__enter__()
        out["won"], held[root] = True, lock
    except store.IndexBusy:
        pass
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"

for line in sys.stdin:
    cmd = json.loads(line)
    if "warm" in cmd:
        store.IndexLock(cmd["warm"], 1).held()
        out = []
    elif "release" in cmd:
        out = {root: (lock.held() or {}).get("owner") == lock.owner for root, lock in held.items()}
        for lock in held.values():
            lock.__exit__(None, None, None)
        held.clear()
    else:
        out = [{"won": False} for _ in cmd["roots"]]
        threads = [
            threading.Thread(target=contend, args=(root, cmd["ttl"], start, o))
            for root, start, o in zip(cmd["roots"], cmd["starts"], out)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps(out), flush=True)
"""


class Contenders:
    """`n` contender processes, started once and given one command per round."""

    def __init__(self, n: int):
        env = {**os.environ, "PYTHONPATH": REPO}
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CONTENDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            for _ in range(n)
        ]
        for p in self.procs:
            assert p.stdout.readline().strip() == "ready"

    def send(self, cmds: list[dict]) -> list:
        """Command i to process i; their answers."""
        for p, cmd in zip(self.procs, cmds, strict=True):
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        return [json.loads(p.stdout.readline()) for p in self.procs]

    def warm(self, root: str) -> None:
        self.send([{"warm": root}] * len(self.procs))

    def round(self, roots: list[str], ttl: float, starts: list[list[float]]) -> list[list[dict]]:
        """Process i tries root k at starts[i][k]; once every try has ended, the winners check that they still hold
        their locks (`still_held`) and release them. answers[k][i]: how process i did on root k."""
        tries = self.send([{"roots": roots, "ttl": ttl, "starts": s} for s in starts])
        released = self.send([{"release": True}] * len(self.procs))
        for out, still in zip(tries, released):
            for root, o in zip(roots, out):
                if o["won"]:
                    o["still_held"] = still[root]
        return [list(per_root) for per_root in zip(*tries)]

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def contenders(s3_server):
    """Contender processes for the module's tests, started after the S3 server so they reach it."""
    c = Contenders(CONTENDERS)
    yield c
    c.close()


def _stale(root: str) -> None:
    """A lock left by a run on another host whose lease expired a minute ago."""
    body = {"owner": "elsewhere:1:dead", "host": "another-host", "pid": 1, "expires": time.time() - 60}
    uri_mod.write_bytes(uri_mod.join(root, store.LOCK), json.dumps(body).encode())


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh index root: a local folder, or a prefix on the S3 test server."""
    if request.param == "local":
        return str(tmp_path / "index")
    import s3fs

    endpoint = request.getfixturevalue("s3_server")
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).makedirs(
        "roiqa-lock", exist_ok=True
    )
    return f"s3://roiqa-lock/{uuid.uuid4().hex[:8]}/index"


def test_exactly_one_of_several_processes_takes_over_a_stale_lock(root, contenders):
    race = RACES["s3" if root.startswith("s3://") else "local"]
    rng = random.Random(0)
    contenders.warm(root)
    for r in range(race.rounds):
        roots = [uri_mod.join(root, f"{r}-{k}") for k in range(race.locks)]
        for where in roots:
            _stale(where)
        start = time.time() + 0.2
        spread = [race.spreads[k % len(race.spreads)] for k in range(race.locks)]
        starts = [[start + rng.uniform(0, s) for s in spread] for _ in range(CONTENDERS)]
        for where, out in zip(roots, contenders.round(roots, ttl=30.0, starts=starts)):
            assert not [o for o in out if o.get("error")], out
            winners = [o for o in out if o["won"]]
            assert len(winners) == 1, f"{where}: {len(winners)} contenders held the lock at once: {out}"
            assert winners[0]["still_held"], out
            assert store.IndexLock(where, 1).held() is None  # the winner released it


def test_a_lock_held_past_its_ttl_is_renewed_and_not_taken_over(root, contenders):
    contenders.warm(root)
    with store.IndexLock(root, ttl_s=1.5, what="long run") as lock:
        time.sleep(4.0)  # longer than the ttl: only the heartbeat keeps the lease
        now = time.time()
        (out,) = contenders.round([root], ttl=1.5, starts=[[now]] * CONTENDERS)
        assert not [o for o in out if o["won"] or "error" in o], out
        holder = lock.held()
        assert holder["owner"] == lock.owner and holder["expires"] > time.time() > holder["acquired"] + 4
        lock.confirm()
    assert lock.held() is None


def test_a_run_that_lost_its_lock_neither_publishes_nor_collects_garbage(tmp_path):
    root = str(tmp_path / "index")
    store.write_manifest(root, "v1", {"version": "v1", "parent": None})
    store.publish(root, "v1")
    mine = store.IndexLock(root, ttl_s=0.9, what="stalled run").__enter__()
    store.write_manifest(root, "v2", {"version": "v2", "parent": "v1"})  # the stalled run's new version
    # its lock is removed (an operator thought it dead) and another run takes it and writes a version of its own
    os.unlink(os.path.join(root, store.LOCK))
    other = store.IndexLock(root, ttl_s=30, what="other run").__enter__()
    store.write_manifest(root, "v3", {"version": "v3", "parent": "v1"})
    time.sleep(0.6)  # two heartbeats of the stalled run

    with pytest.raises(store.LockLost, match="no longer holds the index lock"):
        store.publish(root, "v2", mine)
    with pytest.raises(store.LockLost):
        store.collect_garbage(root, 1, mine)
    assert store.current_version(root) == "v1" and store.list_versions(root) == ["v1", "v2", "v3"]
    assert other.owner in mine.lost  # the heartbeat noticed
    mine.__exit__(None, None, None)
    assert store.IndexLock(root, 1).held()["owner"] == other.owner  # its release left the other run's lock alone

    store.publish(root, "v3", other)  # the holder publishes and collects as before
    assert store.collect_garbage(root, 1, other) == ["v1", "v2"]
    other.__exit__(None, None, None)
    assert store.IndexLock(root, 1).held() is None

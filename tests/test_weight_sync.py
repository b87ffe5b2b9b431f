"""Weight sync: bucketing, object-store publish/receive across real Ray actors, bounded failures,
the collective path over gloo (CPU) and over NCCL (GPU only)."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from policy.weights import load_named_tensors, tensor_sums
from sync import (
    BACKENDS,
    RAY_SYSTEM_CONFIG,
    ObjectStorePublisher,
    ObjectStoreReceiver,
    WeightHandle,
    WeightSyncError,
    WeightSyncLost,
    WeightSyncTimeout,
    bucketize,
    free_port,
    make_publisher,
    make_receiver,
    unbucketize,
)
from sync.buckets import dtype_from_str
from sync.object_store import _joined, plan_buckets

ROOT = str(Path(__file__).resolve().parents[1])


def mixed_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=g)
    return [
        ("lm.embed.weight", torch.randn(17, 5, generator=g)),
        ("lm.norm.weight", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("gen.proj.weight", torch.randn(3, 4, 2, generator=g).half()),
        ("counter", torch.randint(0, 1000, (7,), generator=g)),
        ("mask", torch.rand(4, 3, generator=g) > 0.5),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 4)),
        ("transposed", base.t()),  # not contiguous
        ("bytes", torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8)),
        ("lm.head.weight", torch.randn(40, 3, generator=g).to(torch.bfloat16)),
    ]


def assert_same(got: dict[str, torch.Tensor], want: list[tuple[str, torch.Tensor]]) -> None:
    assert sorted(got) == sorted(n for n, _ in want)
    for name, t in want:
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name].cpu(), t), name


# ------------------------------------------------------------------------------------------ buckets
@pytest.mark.parametrize("bucket_bytes", [1, 48, 256, 1 << 30])
def test_bucketize_round_trip(bucket_bytes: int) -> None:
    tensors = mixed_tensors()
    buckets = bucketize(tensors, bucket_bytes)
    got = {}
    for b in buckets:
        assert b.buffer.dim() == 1 and b.buffer.is_contiguous()
        assert {e.name for e in b.meta.entries} and str(b.buffer.dtype) == f"torch.{b.meta.dtype}"
        # a bucket only exceeds the budget when it holds one tensor
        assert b.nbytes <= bucket_bytes or len([e for e in b.meta.entries if e.numel]) <= 1
        for name, view in unbucketize(b):
            if view.numel():  # views into the flat buffer, no copy
                start = b.buffer.data_ptr()
                assert start <= view.data_ptr() < start + b.nbytes
            got[name] = view
    assert_same(got, tensors)
    if bucket_bytes == 1 << 30:
        assert len(buckets) == len({t.dtype for _, t in tensors})  # one bucket per dtype
    if bucket_bytes <= 48:
        assert len(buckets) > len({t.dtype for _, t in tensors})


def test_bucketize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        bucketize([("a", torch.zeros(1)), ("a", torch.zeros(1))], 64)
    with pytest.raises(ValueError):
        bucketize([("a", torch.zeros(1))], 0)
    (b,) = bucketize([("a", torch.zeros(4))], 64)
    with pytest.raises(ValueError, match="does not match"):
        list(unbucketize((b.meta, torch.zeros(3))))


def test_handle_is_small_and_picklable() -> None:
    handle = WeightHandle(version=3, backend="nccl", buckets=tuple(b.meta for b in bucketize(mixed_tensors(), 64)),
                            total_bytes=1)
    again = pickle.loads(pickle.dumps(handle))
    assert again == handle and again.num_tensors == len(mixed_tensors())
    assert len(pickle.dumps(handle)) < 4096


def test_registry() -> None:
    assert {"object_store", "nccl"} <= set(BACKENDS)
    assert isinstance(make_publisher("object_store", bucket_mb=1), ObjectStorePublisher)
    assert isinstance(make_receiver("object_store"), ObjectStoreReceiver)
    assert make_receiver("gloo").backend == "gloo"
    with pytest.raises(ValueError, match="unknown weight-sync backend 'carrier_pigeon'"):
        make_publisher("carrier_pigeon")


def test_plan_buckets_ships_chunked_views() -> None:
    """Tensors larger than chunk_bytes travel as consecutive views of at most chunk_bytes (Ray copies a
    buffer over 1 MiB with threads it spawns for that buffer alone); nothing is copied."""
    tensors = mixed_tensors() + [("big", torch.arange(100, dtype=torch.float32))]
    metas, parts = plan_buckets(tensors, 1 << 20, chunk_bytes=64)
    by_name = dict(tensors)
    for meta, part in zip(metas, parts, strict=True):
        for e, x in zip(meta.entries, part, strict=True):
            t = by_name[e.name]
            if t.numel() * t.element_size() > 64:
                assert isinstance(x, list) and all(c.nbytes <= 64 for c in x)
                if t.is_contiguous():  # views of the tensor's own memory, in order
                    assert [c.__array_interface__["data"][0] for c in x] == [t.data_ptr() + 64 * i
                                                                             for i in range(len(x))]
                got = np.concatenate(x)
            else:
                assert isinstance(x, np.ndarray) and x.nbytes <= 64
                got = x
            assert bytes(got) == bytes(t.contiguous().view(-1).view(torch.uint8).numpy())
    _, whole = plan_buckets(tensors, 1 << 20, chunk_bytes=None)
    assert all(isinstance(x, np.ndarray) for part in whole for x in part)


def test_joined_is_a_view_when_chunks_are_adjacent() -> None:
    buf = np.arange(256, dtype=np.uint8)
    buf.flags.writeable = False
    view = _joined([buf[0:64], buf[64:128], buf[128:200]])
    assert view.__array_interface__["data"][0] == buf.__array_interface__["data"][0]
    assert not view.flags.writeable and bytes(view) == bytes(buf[:200])
    gap = _joined([buf[0:64], buf[72:100]])  # not back to back: copied, same bytes
    assert not np.shares_memory(gap, buf) and bytes(gap) == bytes(buf[0:64]) + bytes(buf[72:100])


def test_publisher_releases_the_oldest_version_before_the_put() -> None:
    """keep_last counts the version being published: the older ones are dropped before the new objects are
    written, so a version nobody else holds leaves its space to the next one."""
    seen = []

    class Probe(ObjectStorePublisher):
        def _put_all(self, ray, parts):
            seen.append(self.live_versions)
            return [object() for _ in parts]

    for keep, want in ((1, [[], [], []]), (2, [[], [1], [2]])):
        seen.clear()
        pub = Probe(bucket_mb=1, keep_last=keep)
        for v in (1, 2, 3):
            pub.publish(v, mixed_tensors(v))
        assert seen == want and pub.live_versions == [1, 2, 3][-keep:]
        pub.close()
        assert pub.live_versions == []


# --------------------------------------------------------------------------------------------- Ray
@ray.remote(num_cpus=0)
class Learner:
    """Rank 0 side; holds one publisher per key (several groups may coexist in one process)."""

    def __init__(self) -> None:
        self.pubs = {}

    def make(self, key: str, backend: str, **kw) -> None:
        self.pubs[key] = make_publisher(backend, **kw)

    def init_group(self, key: str, addr: str, port: int, world_size: int) -> None:
        self.pubs[key].init_group(addr, port, world_size, timeout_s=60)

    def publish(self, key: str, version: int, seed: int) -> WeightHandle:
        return self.pubs[key].publish(version, mixed_tensors(seed))

    def publish_big(self, key: str, version: int, numel: int) -> WeightHandle:
        return self.pubs[key].publish(version, [("big", torch.ones(numel))])

    def wait(self, key: str, timeout_s: float) -> None:
        self.pubs[key].wait(timeout_s)

    def live_versions(self, key: str) -> list[int]:
        return self.pubs[key].live_versions


@ray.remote(num_cpus=0)
class Worker:
    """Rollout-worker side; one receiver per key."""

    def __init__(self) -> None:
        self.recvs = {"object_store": make_receiver("object_store")}
        self.version = -1

    def make(self, key: str, backend: str, **kw) -> None:
        self.recvs[key] = make_receiver(backend, **kw)

    def init_group(self, key: str, addr: str, port: int, world_size: int, rank: int) -> None:
        self.recvs[key].init_group(addr, port, world_size, rank, timeout_s=60)

    def update_weights(self, handle: WeightHandle, timeout_s: float = 30.0, key: str | None = None):
        recv = self.recvs[key or handle.backend]
        state = {name: t.clone() for name, t in recv.receive(handle, timeout_s)}
        self.version = handle.version
        return self.version, state

    def take_weights(self, handle: WeightHandle, timeout_s: float = 30.0) -> dict:
        """A replica's load (``load_trainable(share=True)``) into parameters named as the handle's tensors, two
        names on one tied parameter; what it took without a copy and what it holds."""
        if not hasattr(self, "params"):
            self.params = {e.name: torch.nn.Parameter(torch.zeros(e.shape, dtype=dtype_from_str(m.dtype)),
                                                      requires_grad=False) for m in handle.buckets for e in m.entries}
            self.tied = self.params["tied"] = self.params["big"]
            self.ids = {n: id(p) for n, p in self.params.items()}
        got = list(self.recvs["object_store"].receive(handle, timeout_s))
        got.append(("tied", dict(got)["big"]))
        received = {n: t.data_ptr() for n, t in got}
        load_named_tensors(self.params, got, share=True)
        return {"shared": sorted(n for n, p in self.params.items() if p.data_ptr() == received[n]),
                "same_objects": all(id(p) == self.ids[n] for n, p in self.params.items()),
                "tied_sum": float(self.tied.double().sum()), "sums": tensor_sums(self.params)}

    def try_update(self, handle: WeightHandle, timeout_s: float, key: str | None = None):
        t0 = time.monotonic()
        try:
            self.update_weights(handle, timeout_s, key)
        except WeightSyncError as e:
            return type(e).__name__, str(e), time.monotonic() - t0
        return None, "", time.monotonic() - t0


@pytest.fixture(scope="module")
def actors():
    paths = (ROOT, str(Path(__file__).parent), os.environ.get("PYTHONPATH"))  # workers import this module
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=RAY_SYSTEM_CONFIG)
    learner, w1, w2 = Learner.remote(), Worker.remote(), Worker.remote()
    yield learner, w1, w2
    ray.shutdown()


def test_object_store_actor_to_actor(actors) -> None:
    learner, worker, _ = actors
    ray.get(learner.make.remote("os", "object_store", bucket_mb=0.0002))
    handle = ray.get(learner.publish.remote("os", 1, seed=1))
    assert handle.version == 1 and handle.backend == "object_store" and len(handle.refs) > 3
    version, state = ray.get(worker.update_weights.remote(handle))
    assert version == 1
    assert_same(state, mixed_tensors(1))

    handle2 = ray.get(learner.publish.remote("os", 2, seed=2))
    assert ray.get(learner.live_versions.remote("os")) == [2]  # older version released by the publisher ...
    version, state = ray.get(worker.update_weights.remote(handle))  # ... but alive while a handle holds it
    assert version == 1 and torch.equal(state["counter"], mixed_tensors(1)[3][1])
    version, state = ray.get(worker.update_weights.remote(handle2))
    assert version == 2
    assert_same(state, mixed_tensors(2))


@pytest.mark.parametrize("chunk_bytes", [64, 100, None])
def test_object_store_chunked_buckets_round_trip(actors, chunk_bytes) -> None:
    """Chunked tensors (adjacent chunks: one zero-copy view; 100-byte chunks leave alignment gaps: copied),
    buckets put from 3 threads, read by the actors and here."""
    learner, worker, _ = actors
    key = f"chunks{chunk_bytes}"
    ray.get(learner.make.remote(key, "object_store", bucket_mb=0.0002, chunk_bytes=chunk_bytes, put_threads=3))
    for version in (1, 2):
        handle = ray.get(learner.publish.remote(key, version, seed=10 + version))
        assert len(handle.refs) > 3
        got_version, state = ray.get(worker.update_weights.remote(handle))
        assert got_version == version
        assert_same(state, mixed_tensors(10 + version))
        assert_same(dict(ObjectStoreReceiver().receive(handle, 10)), mixed_tensors(10 + version))


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_chunks_come_back_adjacent_and_join_without_copy(actors, chunk_bytes) -> None:
    """Ray's pickle 5 layout puts a tensor's chunks back to back in the object, so the receiver's view over
    them is zero-copy (the fallback copy is for a layout that ever differs)."""
    t = torch.arange(3 * chunk_bytes // 4 + 5, dtype=torch.float32)  # 3 chunks and a bit
    _, parts = plan_buckets([("t", t)], 1 << 30, chunk_bytes=chunk_bytes)
    (chunks,) = ray.get(ray.put(parts[0]))
    assert len(chunks) == 4
    joined = _joined(chunks)
    assert joined.__array_interface__["data"][0] == chunks[0].__array_interface__["data"][0]
    assert torch.equal(torch.from_numpy(joined.copy()).view(torch.float32), t)


def test_bucket_object_not_matching_its_metadata_is_rejected(actors) -> None:
    (bucket,) = bucketize([("w", torch.zeros(4)), ("b", torch.zeros(2))], 1 << 20)
    raw = np.zeros(16, dtype=np.uint8)
    for bad in ([raw[:8], raw[:8]], [[raw[:8], raw[8:12]], raw[:8]], [raw, "x"], raw[:20], np.zeros(6, np.float32)):
        handle = WeightHandle(version=1, backend="object_store", buckets=(bucket.meta,), total_bytes=24,
                              refs=(ray.put(bad),))
        with pytest.raises(WeightSyncError, match="does not match its metadata"):
            ObjectStoreReceiver().receive(handle, 10)


def _store_bytes_used() -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used


def test_old_version_leaves_the_store_once_workers_loaded_the_new_one(actors) -> None:
    """Neither the publisher (keep_last=1) nor the receivers (their zero-copy views) pin a version the
    workers have moved past: its objects are deleted from the object store, so the next put can reuse
    that (resident) space."""
    learner, w1, w2 = actors
    numel = 3 << 20  # 12 MiB of float32 per version
    ray.get(learner.make.remote("gc", "object_store", bucket_mb=4))
    base = _store_bytes_used()
    h1 = ray.get(learner.publish_big.remote("gc", 1, numel))
    ray.get([w.update_weights.remote(h1) for w in (w1, w2)])
    assert _store_bytes_used() >= base + 4 * numel
    del h1
    h2 = ray.get(learner.publish_big.remote("gc", 2, numel))
    ray.get([w.update_weights.remote(h2) for w in (w1, w2)])
    deadline = time.monotonic() + 20
    while _store_bytes_used() >= base + 8 * numel and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _store_bytes_used() < base + 5 * numel  # version 2 only (+ metadata)
    assert ray.get(learner.live_versions.remote("gc")) == [2]


def test_replicas_take_the_store_views_as_their_weights_and_let_go_on_the_next_version(actors) -> None:
    """``load_trainable(share=True)``, the rollout replicas' load: every received tensor becomes the parameter's
    storage (the same parameter objects, a tied one included); the replicas on a node then hold one copy of
    the weights, in the store, pinned until they take the next version, and then let go."""
    learner, w1, w2 = actors
    numel = 3 << 20  # 12 MiB of float32 per version
    ray.get(learner.make.remote("share", "object_store", bucket_mb=4))
    base = _store_bytes_used()
    h1 = ray.get(learner.publish_big.remote("share", 1, numel))
    for got in ray.get([w.take_weights.remote(h1) for w in (w1, w2)]):
        assert got["shared"] == ["big", "tied"] and got["same_objects"]
        assert got["sums"] == {"big": numel, "tied": numel} and got["tied_sum"] == numel
    del h1
    h2 = ray.get(learner.publish_big.remote("share", 2, numel))
    assert ray.get(learner.live_versions.remote("share")) == [2]
    assert _store_bytes_used() >= base + 8 * numel  # version 1 is still the replicas' weights
    ray.get([w.take_weights.remote(h2) for w in (w1, w2)])
    deadline = time.monotonic() + 20
    while _store_bytes_used() >= base + 8 * numel and time.monotonic() < deadline:
        time.sleep(0.05)
    assert base + 4 * numel <= _store_bytes_used() < base + 5 * numel  # version 2 only, once for both


def test_shared_load_copies_what_it_cannot_take() -> None:
    """Another dtype, or an empty tensor, is copied into the parameter; shape and name errors still raise."""
    own = {"w": torch.nn.Parameter(torch.zeros(2, 3)), "h": torch.nn.Parameter(torch.zeros(4).half()),
           "e": torch.nn.Parameter(torch.zeros(0, 2))}
    w, h = torch.randn(2, 3), torch.randn(4)
    assert load_named_tensors(own, {"w": w, "h": h, "e": torch.zeros(0, 2)}, share=True) == 3
    assert own["w"].data_ptr() == w.data_ptr() and own["w"].requires_grad
    assert own["h"].dtype == torch.float16 and own["h"].data_ptr() != h.data_ptr()
    assert torch.equal(own["h"].float(), h.half().float())
    with pytest.raises(ValueError, match="shape"):
        load_named_tensors(own, {"w": torch.zeros(3, 2)}, share=True)
    with pytest.raises(KeyError, match="unknown"):
        load_named_tensors(own, {"x": w}, share=True)


def test_object_store_driver_publish_local_receive(actors) -> None:
    pub = ObjectStorePublisher(bucket_mb=1)
    tensors = mixed_tensors(5)
    handle = pub.publish(10, tensors)
    assert handle.total_bytes == sum(t.numel() * t.element_size() for _, t in tensors)
    assert_same(dict(ObjectStoreReceiver().receive(handle, 10)), tensors)
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(10, tensors)
    with pytest.raises(WeightSyncError, match="backend 'object_store'"):
        make_receiver("gloo").receive(handle, 1)


@ray.remote(num_cpus=0)
def _late(seconds: float):
    time.sleep(seconds)
    return None


def test_object_never_arrives_raises_timeout(actors) -> None:
    _, worker, _ = actors
    (bucket,) = bucketize([("w", torch.zeros(4))], 1 << 20)
    slow = _late.remote(60)
    handle = WeightHandle(version=42, backend="object_store", buckets=(bucket.meta,), total_bytes=16, refs=(slow,))
    kind, msg, took = ray.get(worker.try_update.remote(handle, 1.5), timeout=30)
    assert kind == "WeightSyncTimeout"
    assert "version 42" in msg and "'object_store'" in msg and "1.5 s" in msg
    assert took < 10
    t0 = time.monotonic()  # same on the driver, as an exception
    with pytest.raises(WeightSyncTimeout) as err:
        ObjectStoreReceiver().receive(handle, 1.0)
    assert time.monotonic() - t0 < 10 and err.value.version == 42
    ray.cancel(slow, force=True)


def test_timeout_error_crosses_ray() -> None:
    err = pickle.loads(pickle.dumps(WeightSyncLost(3, "object_store", 2.0, "owner died")))
    assert isinstance(err, WeightSyncTimeout) and err.version == 3 and "owner died" in str(err)


def test_owner_died_raises_lost(actors) -> None:
    _, worker, _ = actors
    doomed = Learner.remote()
    ray.get(doomed.make.remote("os", "object_store", bucket_mb=1))
    handle = ray.get(doomed.publish_big.remote("os", 1, 1 << 20))  # 4 MiB: lives in plasma, not inlined
    ray.kill(doomed)
    gone_by = time.monotonic() + 30  # ray.kill is asynchronous: a call may still be served just after it
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < gone_by:
            ray.get(doomed.live_versions.remote("os"), timeout=30)
            time.sleep(0.2)
    deadline = time.monotonic() + 20  # Ray learns of the owner's death asynchronously
    while time.monotonic() < deadline:
        try:
            ray.get(handle.refs[0], timeout=5)
        except ray.exceptions.ObjectLostError:
            break
        time.sleep(0.5)
    kind, msg, took = ray.get(worker.try_update.remote(handle, 5.0), timeout=60)
    assert kind == "WeightSyncLost", (kind, msg)
    assert took < 20


# ---------------------------------------------------------------------------- collective path (gloo)
def test_collective_gloo_receive_without_publisher_times_out(actors) -> None:
    learner, _, worker = actors
    port = free_port()
    ray.get([learner.make.remote("lonely", "gloo"), worker.make.remote("lonely", "gloo")])
    ray.get([learner.init_group.remote("lonely", "127.0.0.1", port, 2),
             worker.init_group.remote("lonely", "127.0.0.1", port, 2, 1)], timeout=60)
    (bucket,) = bucketize([("w", torch.zeros(4))], 1 << 20)
    handle = WeightHandle(version=9, backend="gloo", buckets=(bucket.meta,), total_bytes=16, group={"world_size": 2})
    kind, msg, took = ray.get(worker.try_update.remote(handle, 1.0, "lonely"), timeout=30)
    assert kind == "WeightSyncTimeout" and "version 9" in msg and "'gloo'" in msg
    assert took < 10


def test_collective_gloo_broadcast(actors) -> None:
    """The NCCL publisher/receiver code path with dist_backend='gloo': learner rank 0 + two workers."""
    learner, *workers = actors
    port = free_port()
    ray.get([learner.make.remote("g", "gloo", bucket_mb=0.0002), workers[0].make.remote("g", "gloo"),
             workers[1].make.remote("g", "gloo", stream=True)])
    joins = [w.init_group.remote("g", "127.0.0.1", port, 3, rank) for rank, w in enumerate(workers, start=1)]
    ray.get([learner.init_group.remote("g", "127.0.0.1", port, 3), *joins], timeout=60)
    for version in (1, 2):
        handle = ray.get(learner.publish.remote("g", version, seed=version))
        assert handle.backend == "gloo" and not handle.refs and len(handle.buckets) > 3
        results = [w.update_weights.remote(handle, 30.0, "g") for w in workers]
        ray.get(learner.wait.remote("g", 30.0), timeout=60)
        for got_version, state in ray.get(results, timeout=60):
            assert got_version == version
            assert_same(state, mixed_tensors(version))
    # a publish nobody receives: the learner's wait raises instead of hanging (leaves group "g" unusable)
    ray.get(learner.publish.remote("g", 3, seed=3))
    with pytest.raises(WeightSyncTimeout, match="version 3"):
        ray.get(learner.wait.remote("g", 1.0), timeout=30)


# ------------------------------------------------------------------------------------ NCCL (GPU only)
def _nccl_rank(rank: int, port: int, queue, results) -> None:
    torch.cuda.set_device(rank)
    try:
        if rank == 0:
            pub = make_publisher("nccl", bucket_mb=0.0002)
            pub.init_group("127.0.0.1", port, 2)
            queue.put(pub.publish(1, [(n, t.cuda()) for n, t in mixed_tensors(7)]))
            pub.wait(60)
            results.put((0, "ok"))
        else:
            recv = make_receiver("nccl", device="cuda")
            recv.init_group("127.0.0.1", port, 2, 1)
            handle = queue.get(timeout=60)
            results.put((1, {n: t.cpu().clone() for n, t in recv.receive(handle, 60)}))
    except BaseException as e:  # noqa: BLE001
        results.put((rank, repr(e)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs CUDA with two devices (NCCL refuses two ranks on one GPU)")
def test_nccl_broadcast_two_ranks() -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port, queue, results = free_port(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, queue, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got[0] == "ok", got[0]
    assert isinstance(got[1], dict), got[1]
    assert_same(got[1], mixed_tensors(7))

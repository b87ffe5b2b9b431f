"""Weight sync: publish + load the full weights of a ~100M-parameter policy into 2 Ray actors through
the object-store backend and through the collective backend (over gloo, as on a CPU cluster), against a
plain in-memory copy of the same bytes; bucket size swept; each backend's first sync reported apart.

Sync (what ``Run.publish_and_sync`` does): the driver publishes the state dict (``ObjectStorePublisher``:
``ray.put`` of the buckets), both actors ``receive`` the handle and load every tensor into their
parameters as a CPU rollout worker does (``load_trainable(share=True)``, ``policy.weights.load_named_tensors``:
the received zero-copy views of the store become the parameters); timed from publish to both loads
returned. ``--copy-buckets`` variants copy into the actors' own parameters instead (the host side of a
replica whose weights live elsewhere, e.g. on a GPU). Every sync is a new version; once both actors have
loaded it the publisher lets it go (``release``), as the driver's pool does with the previous version when
it hands out the next. Baseline: ``dst.copy_(src)`` of the same state dict into 2 pre-allocated
destination dicts in this process (the same bytes delivered: one copy per worker). Bandwidth = 2 x
state-dict bytes / time; the ratio is sync bandwidth / copy bandwidth, steady state (median of the
repetitions after the first, which touches every page for the first time).

The cluster is started with ``RAY_SYSTEM_CONFIG`` (what ``services.cluster.start_ray`` does);
``--free-period-ms 1000`` runs it with Ray's default instead. A put that lands on fresh object-store pages
(> 10% of its pages faulted in by this process) is counted.

    python -m bench.weight_sync [--reps 7] [--buckets 8,32,128,512] [--copy-buckets 32,128] [--free-period-ms 100]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import ray
import torch

from bench.common import PeakMemory, machine, median

ROOT = str(Path(__file__).resolve().parents[1])
PAGE = os.sysconf("SC_PAGE_SIZE")


def state_dict_100m(seed: int = 0) -> dict[str, torch.Tensor]:
    """A transformer-shaped float32 state dict of ~103M parameters (8 layers of hidden 1024, MLP 2816,
    plus norms and biases)."""
    g = torch.Generator().manual_seed(seed)
    h, f, sd = 1024, 2816, {}
    for i in range(8):
        p = f"layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + n + "_proj.weight"] = torch.randn(h, h, generator=g)
        for n in ("q", "k", "v"):
            sd[p + n + "_proj.bias"] = torch.randn(h, generator=g)
        sd[p + "gate_proj.weight"] = torch.randn(f, h, generator=g)
        sd[p + "up_proj.weight"] = torch.randn(f, h, generator=g)
        sd[p + "down_proj.weight"] = torch.randn(h, f, generator=g)
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return sd


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@ray.remote(num_cpus=1)
class Replica:
    """A rollout worker's side of the sync: own parameters, the object-store receiver."""

    def __init__(self) -> None:
        from sync import make_receiver

        torch.set_num_threads(1)
        self.params = {k: torch.empty_like(v) for k, v in state_dict_100m().items()}
        self.receiver = make_receiver("object_store")

    def load(self, handle, share: bool = True) -> tuple[float, int]:
        """Seconds and page faults of receive + load (``share``: the rollout worker's ``load_trainable(share=True)``,
        the received views become the parameters; else copied into them)."""
        from policy.weights import load_named_tensors

        f0, t0 = _minflt(), time.perf_counter()
        load_named_tensors(self.params, self.receiver.receive(handle, 120), share=share)
        return time.perf_counter() - t0, _minflt() - f0

    def join(self, addr: str, port: int, world_size: int, rank: int) -> None:
        """Join the collective weight group (gloo: the nccl backend's code on CPU)."""
        from sync import make_receiver

        self.collective = make_receiver("gloo")
        self.collective.init_group(addr, port, world_size, rank, "bench_weights", 120)

    def load_collective(self, handle) -> float:
        from policy.weights import load_named_tensors

        t0 = time.perf_counter()
        load_named_tensors(self.params, self.collective.receive(handle, 120), share=True)
        return time.perf_counter() - t0

    def checksum(self) -> float:
        return float(sum(v.double().sum() for v in self.params.values()))


def tcp_loopback_s(nbytes: int, reps: int) -> float:
    """Median seconds to send ``nbytes`` over one TCP loopback socket (a thread receives): what gloo's
    transport can do on this machine at best."""
    import socket
    import threading

    import numpy as np

    payload, sink = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    with socket.create_server(("127.0.0.1", 0)) as server:
        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                view = memoryview(sink)
                for _ in range(reps + 1):
                    got = 0
                    while got < nbytes:
                        got += conn.recv_into(view[got:], nbytes - got)
                    conn.sendall(b"k")

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        times = []
        with socket.create_connection(server.getsockname()) as conn:
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                conn.sendall(payload)
                conn.recv(1)
                times.append(time.perf_counter() - t0)
        thread.join(60)
    return median(times[1:])


def collective_syncs(reps: int, bucket_mb: float, replicas: list, src: dict) -> tuple[float, list[float]]:
    """The collective backend over gloo: this process is rank 0 (the learner's publisher), the replicas
    ranks 1..N; returns (the first sync's seconds, the timed ones')."""
    from sync import free_port, make_publisher

    pub = make_publisher("gloo", bucket_mb=bucket_mb)
    port = free_port()
    joins = [r.join.remote("127.0.0.1", port, len(replicas) + 1, i + 1) for i, r in enumerate(replicas)]
    pub.init_group("127.0.0.1", port, len(replicas) + 1, 0, "bench_weights", 120)
    ray.get(joins)
    times = []
    for version in range(1, reps + 2):
        t0 = time.perf_counter()
        handle = pub.publish(version, src.items())
        loads = [r.load_collective.remote(handle) for r in replicas]
        pub.wait(120)
        ray.get(loads)
        times.append(time.perf_counter() - t0)
    pub.close()
    return times[0], times[1:]


def service_syncs(n: int, bucket_mb: float, replicas: list, src: dict, nbytes: int) -> tuple[list[float], int]:
    """``n`` back-to-back syncs from a fresh store as the service does them: one publisher (keep_last 1),
    the previous handle held until the next sync has been loaded (the pool keeps it for replacements).
    Returns the sync times and how many puts landed on fresh store pages."""
    from sync import make_publisher

    pub, held, times, fresh = make_publisher("object_store", bucket_mb=bucket_mb), None, [], 0
    for version in range(1, n + 1):
        f0, t0 = _minflt(), time.perf_counter()
        handle = pub.publish(version, src.items())
        fresh += (_minflt() - f0) * PAGE > nbytes / 10
        ray.get([r.load.remote(handle) for r in replicas])
        times.append(time.perf_counter() - t0)
        held = handle  # noqa: F841 - the pool's reference to the current version
    del handle, held
    pub.close()
    return times, fresh


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="timed repetitions after the first (warm-up) one")
    p.add_argument("--buckets", default="8,32,128,512", help="bucket sizes in MiB")
    p.add_argument("--copy-buckets", default="32,128",
                   help="bucket MiB of syncs whose replicas copy into their own parameters (a GPU replica's path)")
    p.add_argument("--service-syncs", type=int, default=12,
                   help="back-to-back syncs as the service does them, first thing on a fresh store (0: none)")
    p.add_argument("--collective-buckets", default="32,128", help="bucket MiB of the collective (gloo) backend")
    p.add_argument("--free-period-ms", type=int, default=None,
                   help="Ray's free_objects_period_milliseconds (default: the project's RAY_SYSTEM_CONFIG)")
    args = p.parse_args(argv)
    from sync import RAY_SYSTEM_CONFIG, make_publisher

    system_config = dict(RAY_SYSTEM_CONFIG)
    if args.free_period_ms is not None:
        system_config["free_objects_period_milliseconds"] = args.free_period_ms
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
    print(machine(), flush=True)
    torch.set_num_threads(1)
    with PeakMemory() as mem:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=3 * 2**30, _system_config=system_config)
        src = state_dict_100m()
        nbytes = sum(t.numel() * t.element_size() for t in src.values())
        n_params = sum(t.numel() for t in src.values())
        dst = [{k: torch.empty_like(v) for k, v in src.items()} for _ in range(2)]
        replicas = [Replica.remote(), Replica.remote()]
        ray.get([r.checksum.remote() for r in replicas])
        service = service_syncs(args.service_syncs, 32, replicas, src, nbytes) if args.service_syncs else None
        # (bucket MiB, shared?): shared = the replicas take the store's views as their parameters (a CPU
        # rollout worker's load); else they copy them into their own (what a GPU worker's load costs on the host)
        variants = [(float(b), True) for b in args.buckets.split(",")]
        variants += [(float(b), False) for b in args.copy_buckets.split(",") if b]
        pubs = {v: make_publisher("object_store", bucket_mb=v[0]) for v in variants}
        copy_s: list[float] = []
        sync_s: dict[tuple, list[float]] = {v: [] for v in variants}
        put_s: dict[tuple, list[float]] = {v: [] for v in variants}
        fresh: dict[tuple, int] = {v: 0 for v in variants}
        first: dict[tuple, float] = {}
        version = 0
        for rep in range(args.reps + 1):  # rep 0 warms up (first touch of pages, object store)
            t0 = time.perf_counter()
            for d in dst:
                for k, v in src.items():
                    d[k].copy_(v)
            if rep:
                copy_s.append(time.perf_counter() - t0)
            for v in variants:
                version += 1
                f0, t0 = _minflt(), time.perf_counter()
                handle = pubs[v].publish(version, src.items())
                f1, t1 = _minflt(), time.perf_counter()
                ray.get([r.load.remote(handle, v[1]) for r in replicas])
                t2 = time.perf_counter()
                if rep:
                    sync_s[v].append(t2 - t0)
                    put_s[v].append(t1 - t0)
                    fresh[v] += (f1 - f0) * PAGE > nbytes / 10
                else:
                    first[v] = t2 - t0
                del handle
                pubs[v].release()  # both actors hold this version now; the next sync brings a new one
        collective = {float(b): collective_syncs(args.reps, float(b), replicas, src)
                      for b in args.collective_buckets.split(",") if b}
        tcp_s = tcp_loopback_s(nbytes, args.reps)
        want = float(sum(v.double().sum() for v in src.values()))
        got = ray.get([r.checksum.remote() for r in replicas])
        assert all(abs(g - want) < 1e-3 * abs(want) + 1 for g in got), (got, want)
        for pub in pubs.values():
            pub.close()
        ray.shutdown()
    gb = 2 * nbytes / 1e9
    copy_bw = gb / median(copy_s)
    print(f"state dict: {n_params / 1e6:.1f}M float32 parameters, {nbytes / 2**20:.0f} MiB, "
          f"{len(src)} tensors; delivered to 2 replicas; Ray free_objects_period_milliseconds "
          f"{system_config['free_objects_period_milliseconds']}; {args.reps} timed syncs per variant")
    print(f"plain in-memory copy x2: {median(copy_s):.3f} s ({copy_bw:.2f} GB/s)")
    if service:
        times, n_fresh = service
        last = times[len(times) // 2:]
        print(f"service pattern, {len(times)} back-to-back syncs on a fresh store (bucket 32 MiB, previous version "
              f"held during the put): puts on fresh pages {n_fresh}/{len(times)}, total {sum(times):.2f} s "
              f"(first {times[0]:.2f} s, then {' '.join(f'{t:.2f}' for t in times[1:len(times) // 2])}); "
              f"median of the last {len(last)} {median(last):.3f} s ({gb / median(last) / copy_bw * 100:.0f}% of copy)")
    best = None
    for v in variants:
        b, shared = v
        t = median(sync_s[v])
        bw = gb / t
        n_b = -(-nbytes // int(b * 2**20))
        kind = "views taken as parameters" if shared else "copied into the replicas' parameters"
        print(f"object store, {kind}, bucket {b:g} MiB (~{n_b} buckets): {t:.3f} s (publish {median(put_s[v]):.3f} s; "
              f"{bw:.2f} GB/s, {bw / copy_bw * 100:.0f}% of copy); first sync {first[v]:.2f} s; "
              f"puts on fresh pages {fresh[v]}/{len(sync_s[v])}")
        if shared and (best is None or bw > best[1]):
            best = (b, bw)
    best_c = None
    for b, (first_s, times) in collective.items():
        bw = gb / median(times)
        print(f"collective (gloo), bucket {b:g} MiB: {median(times):.3f} s ({bw:.2f} GB/s, {bw / copy_bw * 100:.0f}% of "
              f"copy); first sync {first_s:.2f} s")
        if best_c is None or bw > best_c[1]:
            best_c = (b, bw)
    tcp_bw = nbytes / 1e9 / tcp_s
    print(f"TCP loopback, one socket: {tcp_bw:.2f} GB/s ({tcp_bw / copy_bw * 100:.0f}% of copy): the most a "
          f"transport over TCP (gloo) delivers here")
    copied = [gb / median(sync_s[v]) for v in variants if not v[1]]
    print(mem.line())
    if copied:
        print(f"object store, replicas copying, same run: best ratio {max(copied) / copy_bw:.2f}")
    line = f"sync / copy bandwidth ratio: object store {best[1] / copy_bw:.2f} (best bucket {best[0]:g} MiB)"
    if best_c:
        line += f", collective (gloo) {best_c[1] / copy_bw:.2f} (best bucket {best_c[0]:g} MiB)"
    print(line)


if __name__ == "__main__":
    main()

"""Weight sync: publish + load the full weights of a ~100M-parameter policy into 2 Ray actors through
the object-store backend, against a plain in-memory copy of the same bytes; bucket size swept.

Sync (what ``Run.publish_and_sync`` does): the driver publishes the state dict (``ObjectStorePublisher``:
bucketize + ``ray.put``), both actors ``receive`` the handle and copy every tensor into their own
pre-allocated parameters (``policy.model.copy_named_tensors``, what ``load_trainable`` does); timed from
publish to both loads returned. Baseline: ``dst.copy_(src)`` of the same state dict into 2 pre-allocated
destination dicts in this process (the same bytes delivered: one copy per worker).
Bandwidth = 2 x state-dict bytes / time; the ratio is sync bandwidth / copy bandwidth.

    python -m bench.weight_sync [--reps 5] [--buckets 8,32,128,512]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import ray
import torch

from bench.common import PeakMemory, machine, median

ROOT = str(Path(__file__).resolve().parents[1])


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


@ray.remote(num_cpus=1)
class Replica:
    """A rollout worker's side of the sync: own parameters, the object-store receiver."""

    def __init__(self) -> None:
        from learner.weight_sync import make_receiver

        torch.set_num_threads(1)
        self.params = {k: torch.empty_like(v) for k, v in state_dict_100m().items()}
        self.receiver = make_receiver("object_store")

    def load(self, handle) -> float:
        from policy.model import copy_named_tensors

        t0 = time.perf_counter()
        copy_named_tensors(self.params, self.receiver.receive(handle, 120))
        return time.perf_counter() - t0

    def checksum(self) -> float:
        return float(sum(v.double().sum() for v in self.params.values()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--buckets", default="8,32,128,512", help="bucket sizes in MiB")
    p.add_argument("--packed-bucket", type=float, default=32, help="bucket MiB of the packed (before) variant")
    args = p.parse_args(argv)
    from learner.weight_sync import make_publisher

    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
    print(machine(), flush=True)
    torch.set_num_threads(1)
    with PeakMemory() as mem:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=3 * 2**30)
        src = state_dict_100m()
        nbytes = sum(t.numel() * t.element_size() for t in src.values())
        n_params = sum(t.numel() for t in src.values())
        dst = [{k: torch.empty_like(v) for k, v in src.items()} for _ in range(2)]
        replicas = [Replica.remote(), Replica.remote()]
        ray.get([r.checksum.remote() for r in replicas])
        buckets = [float(b) for b in args.buckets.split(",")]
        # "packed": the flat-buffer-per-bucket publisher (before); the default ships tensors' own bytes
        variants = [(b, False) for b in buckets] + [(args.packed_bucket, True)]
        pubs = {v: make_publisher("object_store", bucket_mb=v[0], packed=v[1]) for v in variants}
        copy_s: list[float] = []
        sync_s: dict[tuple, list[float]] = {v: [] for v in variants}
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
                t0 = time.perf_counter()
                handle = pubs[v].publish(version, src.items())
                ray.get([r.load.remote(handle) for r in replicas])
                if rep:
                    sync_s[v].append(time.perf_counter() - t0)
                del handle
        want = float(sum(v.double().sum() for v in src.values()))
        got = ray.get([r.checksum.remote() for r in replicas])
        assert all(abs(g - want) < 1e-3 * abs(want) + 1 for g in got), (got, want)
        ray.shutdown()
    gb = 2 * nbytes / 1e9
    copy_bw = gb / median(copy_s)
    print(f"state dict: {n_params / 1e6:.1f}M float32 parameters, {nbytes / 2**20:.0f} MiB, "
          f"{len(src)} tensors; delivered to 2 replicas")
    print(f"plain in-memory copy x2: {median(copy_s):.3f} s ({copy_bw:.2f} GB/s)")
    best = None
    for v in variants:
        b, packed = v
        bw = gb / median(sync_s[v])
        n_b = -(-nbytes // int(b * 2**20))
        kind = "packed flat buffers (before)" if packed else "tensor bytes"
        print(f"object store, {kind}, bucket {b:g} MiB (~{n_b} buckets): {median(sync_s[v]):.3f} s "
              f"({bw:.2f} GB/s, {bw / copy_bw * 100:.0f}% of copy)")
        if not packed and (best is None or bw > best[1]):
            best = (b, bw)
    print(mem.line())
    print(f"sync / copy bandwidth ratio: {best[1] / copy_bw:.2f} (best bucket {best[0]:g} MiB)")


if __name__ == "__main__":
    main()

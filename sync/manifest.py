"""The per-module sync manifest: how a LoRA weight sync proves that every adapted module got this version.

The publisher's side (the learner) computes, for every module its policy adapts, the number of adapter tensors
it ships and a checksum of their contents (:func:`build`); the manifest rides in the ``WeightHandle``. A
receiver records the names it received and, after loading them, checks every module ITS OWN policy adapts
(built from the same ``model`` section, so it knows the full list independently of what arrived) against the
manifest (:func:`verify`): the module is in the manifest, all of its tensors arrived (count = the manifest's =
its own), and its loaded tensors hash to the manifest's checksum. Any failure raises ``WeightSyncMismatch`` (a
``WeightSyncError``) naming the module(s): a sync that dropped a module never passes as a successful one, and
the rollout pool stops the run on it instead of retrying (``rollout.pool``).

Checksum: CRC-32 over, in name order, each tensor's name, shape and dtype and then its raw bytes: exact (any
changed bit, shape or missing tensor changes it), cheap at adapter sizes (a few MiB to a few hundred).
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

import torch

from .base import ModuleDigest, WeightHandle, WeightSyncMismatch
from .buckets import dtype_to_str

__all__ = ["build", "checksum", "recording", "verify"]

SHOWN = 5  # modules named in one error line


def checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """CRC-32 (8 hex digits) of the tensors' names, shapes, dtypes and bytes, in the given order."""
    crc = 0
    for name, t in named:
        crc = zlib.crc32(f"{name}|{tuple(t.shape)}|{dtype_to_str(t.dtype)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def build(named: Mapping[str, torch.Tensor], modules: Mapping[str, Sequence[str]]) -> dict[str, ModuleDigest]:
    """The manifest of what ``named`` holds of each adapted module (``modules``: module -> its tensor names)."""
    out = {}
    for module, names in modules.items():
        present = [n for n in sorted(names) if n in named]
        out[module] = ModuleDigest(len(present), checksum((n, named[n]) for n in present))
    return out


def recording(pairs: Iterable[tuple[str, torch.Tensor]], seen: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``pairs`` unchanged, appending every name to ``seen`` as it passes (what a receiver loaded)."""
    for name, t in pairs:
        seen.append(name)
        yield name, t


def verify(handle: WeightHandle, modules: Mapping[str, Sequence[str]], received: Collection[str],
           loaded: Mapping[str, torch.Tensor]) -> None:
    """Check every adapted module of the receiver (``modules``) against ``handle.manifest``: in it, all of
    its tensors among ``received``, and the checksum of its ``loaded`` tensors (the receiver's own, after the
    load) equal to the manifest's. Modules in the manifest that the receiver does not adapt are an error too
    (the two sides were built from different ``model.lora`` settings). Raises WeightSyncMismatch naming them."""
    manifest, got = handle.manifest, set(received)
    problems: list[str] = []
    for module, names in sorted(modules.items()):
        want = manifest.get(module)
        arrived = sum(n in got for n in names)
        if want is None:
            problems.append(f"{module}: not in the manifest ({arrived}/{len(names)} tensors arrived)")
        elif want.count != len(names) or arrived != len(names):
            problems.append(f"{module}: {arrived}/{len(names)} tensors arrived, the publisher shipped {want.count}")
        elif (digest := checksum((n, loaded[n]) for n in sorted(names))) != want.checksum:
            problems.append(f"{module}: checksum {digest} after loading, the publisher's is {want.checksum}")
    extra = sorted(set(manifest) - set(modules))
    if extra:
        problems.append(f"{len(extra)} module(s) in the manifest that this receiver does not adapt "
                        f"({', '.join(extra[:SHOWN])})")
    if problems:
        more = f"; ... ({len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise WeightSyncMismatch(f"LoRA weight sync of version {handle.version} via {handle.backend!r} failed "
                              f"verification for {len(problems)} module(s): {'; '.join(problems[:SHOWN])}{more}")

"""Data-parallel ranks: which rank this process is, and whether every rank ended with the same weights."""

from __future__ import annotations

import hashlib
import os


def world_rank() -> int:
    """This process's rank among the training processes (torchrun, Ray Train and accelerate set RANK); 0 alone."""
    return int(os.environ.get("RANK", "0") or 0)


def weights_digest(model) -> str:
    """sha256 of the trainable parameters (names, shapes and bytes, in name order) of a model or its DDP wrapper."""
    import torch

    model = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if not param.requires_grad:
                continue
            tensor = param.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def replica_digests(model, sharded: bool = False) -> list[str] | None:
    """Every rank's `weights_digest`, in rank order, gathered on all ranks; None for a single process.

    With data parallelism (DDP) they must all be equal: the ranks average their gradients before each
    step. Sharded parameters (FSDP, DeepSpeed ZeRO-3) differ by design and are not compared (None).
    """
    import torch.distributed as dist

    if sharded or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, weights_digest(model))
    return [str(d) for d in gathered]

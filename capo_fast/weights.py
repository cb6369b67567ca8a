"""Weights out of the training model: HF-named full tensors, for the engines' weight sync and for export."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def model_weights(model: torch.nn.Module, *, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of a (possibly ZeRO-3 partitioned) model, gathered bucket by bucket.

    Under ZeRO-3 each bucket of parameters is all-gathered on every rank, copied out, and released
    before the next, so peak extra memory is one bucket. ZeRO-0/1/2 keep full parameters: no copy.
    """
    # Tied weights are yielded under every name (lm_head.weight too): vLLM's in-place reload
    # re-initialises any layer it is not given weights for.
    named = list(model.named_parameters(remove_duplicate=False))
    partitioned = any(hasattr(p, "ds_id") for _, p in named)
    if not partitioned:
        for name, param in named:
            yield name, param.detach()
        return
    import deepspeed

    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for index, (name, param) in enumerate(named):
        bucket.append((name, param))
        size += param.ds_numel * param.element_size()
        if size >= bucket_bytes or index == len(named) - 1:
            with deepspeed.zero.GatheredParameters(list({id(p): p for _, p in bucket}.values())):
                copies = [(n, p.detach().clone()) for n, p in bucket]
            yield from copies
            bucket, size = [], 0

"""Running the calibration set through a model one decoder block at a time (collect and refit).

The hidden states entering block 0 and the keyword arguments the model passes to *each* block (positions,
masks, rotary embeddings: they differ between sliding-window and global layers, e.g. Gemma-2/3 and Qwen2
with sliding windows) are captured once, with the blocks bypassed; then each block maps the stored hidden
states to the next block's. With streaming, the model stays in CPU memory and each block visits the
execution device only for its own pass, so a model larger than the GPU can be calibrated.
A model dispatched by accelerate
(`device_map`) keeps its placement: its hooks move the inputs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..arch import Adapter
from ..model import model_device


class _Reached(Exception):
    """Raised by a hook to end a forward pass at the module whose input was wanted."""


def move(obj, device, memo: dict | None = None):
    """Tensors inside nested tuples/lists/dicts moved to `device` (other objects unchanged). With `memo`, a
    tensor met again (the same object) is moved once."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))   # the source is kept alive, so its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device, memo) for k, v in obj.items()}
    return obj


def is_dispatched(model: torch.nn.Module) -> bool:
    """Placed across devices by accelerate (device_map): blocks must not be moved by hand."""
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1


def execution_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


def capture_block_inputs(model, adapter: Adapter, batches: list[torch.Tensor], device: torch.device):
    """(hidden states entering block 0 per batch, kwargs[b][i]: the keyword arguments the model passes to block b
    for batch i), on `device`. Every block's forward is bypassed meanwhile, so this costs the embeddings only;
    tensors the model shares between blocks stay shared."""

    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in adapter.blocks]
    memo: dict = {}
    last = len(adapter.blocks) - 1

    def recorder(b):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if b == 0:
                hidden.append(h.to(device))
            kwargs[b].append(move(kw, device, memo))
            if b == last:
                raise _Reached
            return h
        return forward

    # an instance attribute `forward` (accelerate's dispatch hook) is put back afterwards
    saved = [block.__dict__.get("forward") for block in adapter.blocks]
    first = model_device(model)
    try:
        for b, block in enumerate(adapter.blocks):
            block.forward = recorder(b)
        for ids in batches:
            try:
                model(input_ids=ids.to(first), use_cache=False)
            except _Reached:
                pass
    finally:
        for block, forward in zip(adapter.blocks, saved):
            block.__dict__.pop("forward", None)
            if forward is not None:
                block.forward = forward
    return hidden, kwargs


def run_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def input_of(module: torch.nn.Module, block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input that `module` (inside `block`) receives when the block runs on `hidden`; the block's forward
    stops there (the rest of the block is not computed)."""
    seen = []

    def stop(_m, args):
        seen.append(args[0])
        raise _Reached

    hook = module.register_forward_pre_hook(stop)
    try:
        run_block(block, hidden, kwargs)
    except _Reached:
        pass
    finally:
        hook.remove()
    if not seen:
        raise RuntimeError(f"the block never called {type(module).__name__}")
    return seen[0]


@contextmanager
def on_device(model, block: torch.nn.Module, device: torch.device):
    """The block on `device` for the duration (streaming), back where it was afterwards."""
    home = next(block.parameters()).device
    if is_dispatched(model) or home == device:
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)

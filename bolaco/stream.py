"""Running the calibration set through a model one decoder block at a time (collect and refit).

The inputs of block 0 (hidden states and the keyword arguments the model passes to its blocks: positions,
masks, rotary embeddings) are captured once; then each block maps the stored hidden states to the next
block's. With streaming, the model stays in CPU memory and each block visits the execution device only for
its own pass, so a model larger than the GPU can be calibrated. A model dispatched by accelerate
(`device_map`) keeps its placement: its hooks move the inputs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .arch import Adapter


def move(obj, device):
    """Tensors inside nested tuples/lists/dicts moved to `device` (other objects unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def is_dispatched(model: torch.nn.Module) -> bool:
    """Placed across devices by accelerate (device_map): blocks must not be moved by hand."""
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1


def execution_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


def capture_block_inputs(model, adapter: Adapter, batches: list[torch.Tensor], device: torch.device):
    """[(hidden states, kwargs)] with which the model calls block 0 for each batch, on `device`."""

    class _Captured(Exception):
        pass

    captured = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.to(device), move(kwargs, device)))
        raise _Captured

    handle = adapter.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    first = model_device(model)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(first), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


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

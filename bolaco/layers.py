"""The layer a compressed model is made of. This module imports nothing but torch (and typing): an export ships
its source inside the model folder (modeling_bolaco.py), so that plain transformers loads the model without
bolaco."""

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def _plain(m: nn.Module) -> bool:
    """An nn.Linear whose call would do nothing but F.linear: no hooks, no replaced forward."""
    return (type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and "forward" not in m.__dict__)


def wrap_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around existing tensors, skipping nn.Linear.__init__'s random initialisation."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
    return lin


class SharedDown(nn.Module):
    """The down factors of the low-rank layers that read one input (q, k, v; gate, up), stacked into one matrix so
    that the input is multiplied once. The layers of a group are called one after the other on the same tensor:
    the product is kept until each of the `members` has read it, then dropped, so no activation outlives the
    block's forward. `weight` is a non-persistent buffer, so the state dict still holds each layer's own
    `down.weight` (views of it)."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, members: int):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.members = members
        self._last: tuple[torch.Tensor, int, torch.Tensor, int] | None = None   # (input, version, product, reads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        version = -1 if x.is_inference() else x._version   # inference tensors keep no version counter
        last = self._last
        if last is None or last[0] is not x or last[1] != version:
            last = (x, version, F.linear(x, cast(torch.Tensor, self._buffers["weight"])), 0)
        product, reads = last[2], last[3] + 1
        self._last = None if reads >= self.members else (x, version, product, reads)
        return product


class LowRankLinear(nn.Module):
    """y = up(down(x)): down is k x d_in, up is d_out x k with the (optional) bias. Both are plain nn.Linear,
    so peft can target them by name. `dense_bias` records whether the layer it replaces had a bias. After
    `fuse_shared_inputs`, inference (no autograd) takes down(x) as a slice of its group's `shared` product."""

    shared: SharedDown | None      # an instance attribute: a registered module once set, so no class default
    shared_slice: slice

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, dense_bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.dense_bias = dense_bias
        self.down = nn.Linear(d_in, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, d_out, bias=bias, device=device, dtype=dtype)
        self.shared, self.shared_slice = None, slice(0)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                     dense_bias: bool = False) -> "LowRankLinear":
        """Wrap existing tensors: no copy and no random initialisation, since applying a rank map must be cheap."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.dense_bias = dense_bias
        m.down, m.up = wrap_linear(down, None), wrap_linear(up, bias)
        m.shared, m.shared_slice = None, slice(0)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding at batch 1 is bound by per-call cost, which nn.Module's attribute lookup and __call__ dominate
        # (microseconds each on a CPU): plain factors are read from the module dicts and multiplied by F.linear.
        modules = self._modules
        down, up = cast(nn.Module, modules["down"]), cast(nn.Module, modules["up"])
        if _plain(down) and _plain(up):
            up_weight, up_bias = up._parameters["weight"], up._parameters["bias"]
            shared = modules.get("shared")
            if shared is not None and not torch.is_grad_enabled():   # SharedDown registers no hooks of its own
                z = SharedDown.forward(cast(SharedDown, shared), x)[..., self.shared_slice]
            else:
                z = F.linear(x, cast(torch.Tensor, down._parameters["weight"]))
            return F.linear(z, cast(torch.Tensor, up_weight), up_bias)
        return up(down(x))                # peft's LoRA layers, hooks, accelerate's offload wrappers

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def fuse_shared_inputs(model: nn.Module, groups: list[list[str]]) -> int:
    """Give each group of low-rank layers that read one input (module paths, e.g. a block's q, k and v) one
    SharedDown. Call it after the model is on its device: the layers' `down.weight` become views of the stacked
    matrix, which moving the model would turn back into copies. Returns the number of groups fused."""
    fused = 0
    for paths in groups:
        layers = [m for m in map(model.get_submodule, paths)
                  if isinstance(m, LowRankLinear) and _plain(m.down) and m.shared is None]
        if len(layers) < 2 or len(layers) != len(paths):
            continue
        stacked = torch.cat([m.down.weight.detach() for m in layers])
        shared, start = SharedDown(stacked, len(layers)), 0
        for m in layers:
            rank = m.rank
            m.down.weight = nn.Parameter(stacked[start:start + rank], requires_grad=m.down.weight.requires_grad)
            m.shared, m.shared_slice = shared, slice(start, start + rank)
            start += rank
        fused += 1
    return fused

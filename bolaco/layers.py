"""The layer a compressed model is made of. This module imports nothing but torch: an export ships its source
inside the model folder (modeling_bolaco.py), so that plain transformers loads the model without bolaco."""

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


class LowRankLinear(nn.Module):
    """y = up(down(x)): down is k x d_in, up is d_out x k with the (optional) bias. Both are plain nn.Linear,
    so peft can target them by name. `dense_bias` records whether the layer it replaces had a bias."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, dense_bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.dense_bias = dense_bias
        self.down = nn.Linear(d_in, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, d_out, bias=bias, device=device, dtype=dtype)

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
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up
        if _plain(down) and _plain(up):   # two calls of F.linear: decoding at batch 1 is bound by per-call cost
            return F.linear(F.linear(x, down.weight), up.weight, up.bias)
        return up(down(x))                # peft's LoRA layers, hooks, accelerate's offload wrappers

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

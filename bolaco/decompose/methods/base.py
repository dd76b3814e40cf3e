"""The method protocol and its registry (see the package docstring)."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from ...arch import Adapter
from ...errors import BolacoError
from ...registry import Registry
from ..budget import Unit

DenseLayer = Callable[[str], nn.Linear]     # linear id -> the model's original dense layer


class Method:
    name: ClassVar[str] = ""
    module: ClassVar[str | None] = None     # the structured module it decomposes; None: per-matrix factors
    centred: ClassVar[bool] = True          # keeps the mean of what it drops as a bias (the refit fits one too)

    def __init__(self, adapter: Adapter, types: tuple[str, ...], multiple: int):
        self.adapter, self.types, self.multiple = adapter, types, multiple

    def units(self, block: int) -> list[Unit]:
        raise NotImplementedError

    def prepare(self, stats, block: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors named "<unit type>.<part>" from which `build` makes the block's units at any level."""
        raise NotImplementedError

    def prepared_bytes(self) -> int:
        """Bytes `prepare` writes for the whole model (for the disk check before the cache is built)."""
        raise NotImplementedError

    def build(self, unit: Unit, level: int, parts: dict[str, torch.Tensor],
              dense: DenseLayer) -> dict[str, nn.Module]:
        """The layers (linear id -> module) of `unit` at `level`."""
        raise NotImplementedError

    def refit_targets(self, unit: Unit) -> tuple[str, ...]:
        """The linears of `unit` that the closed-loop refit fits to the compressed model's inputs."""
        return ()

    def key(self) -> dict:
        """What `prepare`'s output depends on besides the statistics (for the cache key)."""
        return {"method": self.name, "types": list(self.types), "format": getattr(self, "FORMAT", 1)}


METHODS: Registry[type[Method]] = Registry("decomposition method")


def check_names(method: str, modules: tuple[str, ...]) -> None:
    """decompose.method must name per-matrix factors, decompose.modules structured modules."""
    if METHODS.get(method, "decompose.method").module is not None:
        raise BolacoError(f"decompose.method: '{method}' is a structured module; list it under decompose.modules "
                          f"and give per-matrix factors here ({', '.join(matrix_methods())})")
    for name in modules:
        if METHODS.get(name, "decompose.modules").module is None:
            raise BolacoError(f"decompose.modules: '{name}' is a per-matrix method; structured modules are "
                              f"{', '.join(n for n, m in METHODS.items() if m.module is not None)}")


def matrix_methods() -> list[str]:
    return [n for n, m in METHODS.items() if m.module is None]

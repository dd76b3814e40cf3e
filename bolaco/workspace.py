"""What every command of a study needs: the model, its adapter, the role data and the covariance cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import model as model_io
from .arch import Adapter
from .collect import CovarianceCache, collect
from .data import role_sequences
from .errors import BolacoError
from .study import Study


@dataclass
class Workspace:
    study: Study
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    data: dict[str, torch.Tensor]      # role -> (N, seq_len) token ids

    @classmethod
    def open(cls, study: Study, device: str | None = None) -> "Workspace":
        if "calibration" not in study.data:
            raise BolacoError(f"study '{study.name}' has no data.calibration section")
        t = time.perf_counter()
        model, tokenizer = model_io.load(study.model, device=device)
        adapter = Adapter(model)
        if study.seq_len > adapter.max_seq_len:
            raise BolacoError(f"seq_len {study.seq_len} is longer than the model allows ({adapter.max_seq_len})")
        data = role_sequences(study.data, tokenizer, study.seq_len, study.data_dir)
        print(f"model {study.model}: {adapter.family}, {adapter.n_blocks} blocks, loaded in "
              f"{time.perf_counter() - t:.0f} s; data " +
              ", ".join(f"{r} {tuple(x.shape)}" for r, x in data.items()))
        return cls(study, model, tokenizer, adapter, data)

    def covariances(self, progress: bool = True) -> CovarianceCache:
        return collect(self.model, self.data["calibration"], self.study.cache_dir, self.study.partitions,
                       self.study.batch_size, progress)

"""What every command of a study needs: the model, its adapter, the role data and the covariance cache."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import model as model_io
from .arch import Adapter, adapter_for
from .calibrate import CovarianceCache, collect
from .decompose import RankMap
from .data import describe, role_sequences, token_hash
from .decompose import Compressor, adds_bias, build_bases, make_budget
from .errors import BolacoError
from .export import count_params, export
from .evaluate.perplexity import perplexity
from .decompose import refit
from .study import Study

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    study: Study
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    data: dict[str, torch.Tensor]      # role -> (N, seq_len) token ids

    device: torch.device | None = None   # where collect, bases and refit run (default: where the model is)

    @classmethod
    def open(cls, study: Study, device: str | None = None) -> "Workspace":
        """device: where the work runs. With device_map set in the study, accelerate places the model and
        `device` is only where collect, bases and refit compute (blocks of a model in CPU memory stream)."""
        if "calibration" not in study.data:
            raise BolacoError(f"study '{study.name}' has no data.calibration section")
        t = time.perf_counter()
        model, tokenizer = model_io.load(study.model, dtype=study.dtype, device=device, device_map=study.device_map)
        adapter = adapter_for(model)
        if study.seq_len > adapter.max_seq_len:
            raise BolacoError(f"seq_len {study.seq_len} is longer than the model allows ({adapter.max_seq_len})")
        data = role_sequences(study.data, tokenizer, study.seq_len, study.data_dir)
        log.info(f"model {study.model}: {adapter.family}, {adapter.n_blocks} blocks, loaded in "
                 f"{time.perf_counter() - t:.0f} s; data " +
                 ", ".join(f"{r} {tuple(x.shape)}" for r, x in data.items()))
        return cls(study, model, tokenizer, adapter, data, torch.device(device) if device else None)

    def covariances(self, progress: bool = True) -> CovarianceCache:
        return collect(self.model, self.data["calibration"], self.study.cache_dir, self.study.partitions,
                       self.study.batch_size, progress, device=self.device)

    def compressor(self, progress: bool = True, load: bool = True) -> Compressor:
        """Collect (or reuse) the covariances, build (or reuse) the bases of the study's method and (with `load`)
        read them into device or host memory, where applying a rank map is a slice."""
        bases = build_bases(self.adapter, self.covariances(progress), self.study.method, progress, device=self.device)
        if load:
            bases.load(self.device or next(self.model.parameters()).device, self.adapter.linears)
        return Compressor(self.adapter, bases, make_budget(self.adapter, self.study.method, self.study.rank_multiple))

    def evaluate(self, roles=("search", "test")) -> dict[str, float]:
        return {role: perplexity(self.model, self.data[role], self.study.batch_size, desc=role).ppl
                for role in roles if role in self.data}

    def refit(self, comp: Compressor, ranks: RankMap, cache: bool = True, progress: bool = True,
              sequences: int = 0) -> dict:
        """Closed-loop refitted layers of `ranks` on the calibration data (bolaco.refit), cached per rank map;
        `sequences` > 0: on that many calibration sequences, evenly spaced (every part of a mixture)."""
        calibration = self.data["calibration"]
        if 0 < sequences < len(calibration):
            calibration = calibration[torch.linspace(0, len(calibration) - 1, sequences).round().long()]
        return refit(comp, ranks, calibration, centred=adds_bias(self.study.method),
                     ridge=self.study.refit_ridge, batch_size=self.study.batch_size,
                     cache_root=Path(self.study.cache_dir) / "refit" if cache else None, device=self.device,
                     progress=progress)

    def apply(self, comp: Compressor, ranks: RankMap, cache: bool = True, progress: bool = True) -> None:
        """Make the model carry `ranks`, refitted when the study says so."""
        comp.apply(ranks, self.refit(comp, ranks, cache, progress) if self.study.refit else None)

    def export(self, comp: Compressor, ranks: RankMap, out_dir: str, extra: dict) -> str:
        """Apply `ranks` (refitted when the study says so), evaluate search and test perplexity, write the model."""
        self.apply(comp, ranks)
        ppl = self.evaluate()
        budget = comp.budget
        info = {"method": self.study.method, "remove_target": self.study.remove, "rank_multiple": budget.multiple,
                "refit": {"ridge": self.study.refit_ridge} if self.study.refit else False,
                "decomposable_params": {"dense": budget.decomposable, "kept": budget.params(ranks)},
                "removed_fraction": 1 - budget.params(ranks) / budget.decomposable,
                "perplexity": {"seq_len": self.study.seq_len, **ppl},
                "provenance": {"model": self.study.model, "study": self.study.name,
                               "data": {r: {"corpus": describe(self.study.data[r]) if r in self.study.data else "given",
                                            "sha256": token_hash(x),
                                            "sequences": int(x.shape[0])} for r, x in self.data.items()}},
                **extra}
        out = export(self.model, self.tokenizer, ranks, out_dir, info, self.study.shard_size)
        log.info(f"wrote {out}: {count_params(self.model):,} parameters, removed "
                 f"{info['removed_fraction']:.2%} of the decomposable ones; "
                 + ", ".join(f"{r} ppl {v:.2f}" for r, v in ppl.items()))
        return str(out)

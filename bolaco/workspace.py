"""What every command of a study needs: the model, its adapter, the role data, the covariance cache, the study's
decomposition and its compressor; and the check of the names a study file picks from the registries."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from . import model as model_io
from .arch import Adapter, adapter_for
from .calibrate import CovarianceCache, collect
from .data import describe, role_sequences, token_hash
from .decompose import Compressor, Decomposition, LevelMap, build_bases, check_names as check_methods, refit
from .errors import BolacoError
from .evaluate.perplexity import perplexity
from .export import count_params, export
from .study import Study

log = logging.getLogger(__name__)


def check_names(study: Study) -> None:
    """Every name the study file picks from a registry exists (one line naming the choices otherwise)."""
    from .search import DESIGNS, OBJECTIVES, SAMPLERS
    check_methods(study.decompose.method, study.decompose.modules)
    SAMPLERS.get(study.search.sampler, "search.sampler")
    OBJECTIVES.get(study.search.objective, "search.objective")
    for name in study.search.design:
        DESIGNS.get(name, "search.design")


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
        if study.data.calibration is None:
            raise BolacoError(f"study '{study.name}' has no data.calibration section")
        t = time.perf_counter()
        model, tokenizer = model_io.load(study.model.path, dtype=study.model.dtype, device=device,
                                         device_map=study.model.device_map)
        adapter = adapter_for(model)
        if study.seq_len > adapter.max_seq_len:
            raise BolacoError(f"seq_len {study.seq_len} is longer than the model allows ({adapter.max_seq_len})")
        data = role_sequences(study.data.roles(), tokenizer, study.seq_len, study.data.dir, study.cache_dir)
        log.info(f"model {study.model.path}: {adapter.family}, {adapter.n_blocks} blocks, loaded in "
                 f"{time.perf_counter() - t:.0f} s; data " +
                 ", ".join(f"{r} {tuple(x.shape)}" for r, x in data.items()))
        return cls(study, model, tokenizer, adapter, data, torch.device(device) if device else None)

    @cached_property
    def fingerprint(self) -> str:
        return model_io.fingerprint(self.model)

    @property
    def data_hashes(self) -> dict[str, str]:
        """The token hashes of the roles that decide the trials (a study's identity)."""
        return {r: token_hash(self.data[r]) for r in ("calibration", "search") if r in self.data}

    def covariances(self, progress: bool = True) -> CovarianceCache:
        return collect(self.model, self.data["calibration"], self.study.cache_dir, self.study.collect.partitions,
                       self.study.collect.batch_size, progress, device=self.device)

    @cached_property
    def decomposition(self) -> Decomposition:
        cfg = self.study.decompose
        return Decomposition(self.adapter, cfg.method, cfg.modules, cfg.rank_multiple)

    def compressor(self, progress: bool = True, load: bool = True) -> Compressor:
        """Collect (or reuse) the covariances, build (or reuse) the bases of the study's methods and (with `load`)
        read them into device or host memory, where applying a level map is a slice."""
        bases = build_bases(self.decomposition, self.covariances(progress), progress, device=self.device)
        if load:
            bases.load(self.device or next(self.model.parameters()).device)
        return Compressor(self.decomposition, bases)

    def evaluate(self, roles=("search", "test")) -> dict[str, float]:
        return {role: perplexity(self.model, self.data[role], self.study.evaluate.batch_size, desc=role).ppl
                for role in roles if role in self.data}

    def refit(self, comp: Compressor, levels: LevelMap, cache: bool = True, progress: bool = True,
              sequences: int = 0) -> dict:
        """Closed-loop refitted layers of `levels` on the calibration data (decompose.refit), cached per level map;
        `sequences` > 0: on that many calibration sequences, evenly spaced (every part of a mixture)."""
        calibration = self.data["calibration"]
        if 0 < sequences < len(calibration):
            calibration = calibration[torch.linspace(0, len(calibration) - 1, sequences).round().long()]
        return refit(comp, levels, calibration, ridge=self.study.decompose.refit_ridge,
                     batch_size=self.study.collect.batch_size,
                     cache_root=Path(self.study.cache_dir) / "refit" if cache else None, device=self.device,
                     progress=progress)

    def apply(self, comp: Compressor, levels: LevelMap, refitted: bool | None = None) -> None:
        """Make the model carry `levels`, refitted when asked (default: when the study says so)."""
        refitted = self.study.decompose.refit if refitted is None else refitted
        comp.apply(levels, self.refit(comp, levels) if refitted else None)

    def export(self, comp: Compressor, levels: LevelMap, out_dir: str, extra: dict,
               refitted: bool | None = None) -> str:
        """Apply `levels` (refitted when asked; default: the study's decompose.refit), evaluate search and test
        perplexity, write the model."""
        self.apply(comp, levels, refitted)
        ppl = self.evaluate()
        budget, study = comp.budget, self.study
        refitted = study.decompose.refit if refitted is None else refitted
        info = {"methods": comp.decomposition.describe(), "remove_target": study.budget.remove,
                "refit": {"ridge": study.decompose.refit_ridge} if refitted else False,
                "decomposable_params": {"dense": budget.decomposable, "kept": budget.params(levels)},
                "removed_fraction": 1 - budget.params(levels) / budget.decomposable,
                "perplexity": {"seq_len": study.seq_len, **ppl},
                "provenance": {"model": study.model.path, "study": study.name,
                               "data": {r: {"corpus": describe(study.data.roles()[r])
                                            if r in study.data.roles() else "given",
                                            "sha256": token_hash(x), "sequences": int(x.shape[0])}
                                        for r, x in self.data.items()}},
                **extra}
        out = export(self.model, self.tokenizer, levels, out_dir, info, study.export.shard_size,
                     unit_types=comp.decomposition.unit_types, budget=budget)
        log.info(f"wrote {out}: {count_params(self.model):,} parameters, removed "
                 f"{info['removed_fraction']:.2%} of the decomposable ones; "
                 + ", ".join(f"{r} ppl {v:.2f}" for r, v in ppl.items()))
        return str(out)

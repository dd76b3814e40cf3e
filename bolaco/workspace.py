"""What every command of a study needs: the model, its adapter, the role data and the covariance cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import model as model_io
from .arch import Adapter
from .collect import CovarianceCache, collect
from .budget import RankMap
from .data import role_sequences, token_hash
from .decompose import Compressor, build_bases, make_budget
from .errors import BolacoError
from .export import count_params, export
from .perplexity import perplexity
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

    def compressor(self, progress: bool = True) -> Compressor:
        """Collect (or reuse) the covariances, build (or reuse) the bases of the study's method."""
        bases = build_bases(self.adapter, self.covariances(progress), self.study.method, progress)
        return Compressor(self.adapter, bases, make_budget(self.adapter, self.study.method, self.study.rank_multiple))

    def evaluate(self, roles=("search", "test")) -> dict[str, float]:
        return {role: perplexity(self.model, self.data[role], self.study.batch_size, desc=role).ppl
                for role in roles if role in self.data}

    def export(self, comp: Compressor, ranks: RankMap, out_dir: str, extra: dict) -> str:
        """Apply `ranks`, evaluate search and test perplexity, and write the compressed model."""
        comp.apply(ranks)
        ppl = self.evaluate()
        budget = comp.budget
        info = {"method": self.study.method, "remove_target": self.study.remove, "rank_multiple": budget.multiple,
                "decomposable_params": {"dense": budget.decomposable, "kept": budget.params(ranks)},
                "removed_fraction": 1 - budget.params(ranks) / budget.decomposable,
                "perplexity": {"seq_len": self.study.seq_len, **ppl},
                "provenance": {"model": self.study.model, "study": self.study.name,
                               "data": {r: {"corpus": self.study.data[r].corpus, "sha256": token_hash(x),
                                            "sequences": int(x.shape[0])} for r, x in self.data.items()}},
                **extra}
        out = export(self.model, self.tokenizer, ranks, out_dir, info)
        print(f"wrote {out}: {count_params(self.model):,} parameters, removed "
              f"{info['removed_fraction']:.2%} of the decomposable ones; "
              + ", ".join(f"{r} ppl {v:.2f}" for r, v in ppl.items()))
        return str(out)

"""`bolaco finetune`: load an export, post-train it on the study's train role, merge, and export the result."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from ..data import describe, role_sequences, same_source
from ..errors import BolacoError
from ..evaluate.perplexity import perplexity
from ..export import ExportMeta, count_params, export, load_compressed
from ..finetune import SubspaceTuner
from ..study import Study

log = logging.getLogger(__name__)


def _roles(study: Study) -> dict:
    roles = study.data.roles()
    train = roles.get("train", roles.get("calibration"))
    if train is None:
        raise BolacoError(f"study '{study.name}' names no data.train or data.calibration to train on")
    shared = same_source(train, roles["test"]) if "test" in roles else []
    if shared:   # disjoint sequences, same source: the test figure then measures adaptation, not recovery
        log.warning(f"the training text ({describe(train)}) comes from the same source as the test set "
                    f"({', '.join(shared)}); its test perplexity measures adaptation to that source, not recovery. "
                    "Set data.train to another corpus (e.g. c4-valid) for a held-out figure.")
    return {"train": train, **{r: roles[r] for r in ("search", "test") if r in roles}}


def finetune(study: Study, source: Path, out: str | None, device: str | None) -> Path:
    cfg = study.finetune
    if not (source / "bolaco.json").is_file():
        raise BolacoError(f"no exported bolaco model at {source}: run `make export` (the best trial) "
                          "or pass --from DIR")
    model, tokenizer = load_compressed(source, device=device, fuse=False)   # it will be trained
    if tokenizer is None:
        raise BolacoError(f"{source} has no tokenizer: export it again (bolaco export writes one)")
    meta = ExportMeta.read(source)
    roles = _roles(study)
    data = role_sequences(roles, tokenizer, study.seq_len, study.data.dir, study.cache_dir)
    teacher = None
    if cfg.distill > 0:
        from .. import model as model_io
        teacher, _ = model_io.load(study.model.path, dtype=study.model.dtype, device=device)

    def ppl():
        return {r: perplexity(model, data[r], study.evaluate.batch_size, desc=r).ppl
                for r in ("search", "test") if r in data}

    before = ppl()
    print("before: " + ", ".join(f"{r} ppl {v:.2f}" for r, v in before.items()))
    key = hashlib.sha256(json.dumps([meta.levels, meta.params, cfg.model_dump(mode="json"),
                                     describe(roles["train"])]).encode()).hexdigest()[:12]
    t = time.perf_counter()
    tuner = SubspaceTuner(model, cfg, teacher=teacher)
    losses = tuner.fit(data["train"], checkpoint=Path(study.cache_dir).parent / "finetune" / key)
    seconds = time.perf_counter() - t
    model = tuner.merge()
    after = ppl()
    tokens = cfg.steps * cfg.batch_size * cfg.grad_accum * study.seq_len
    print("after:  " + ", ".join(f"{r} ppl {v:.2f}" for r, v in after.items()) +
          f" ({cfg.steps} steps, {tokens:,} tokens, {seconds:.0f} s)")
    info = dict(meta.info)
    info["finetune"] = {**cfg.model_dump(mode="json"), "source": str(source), "train_data": describe(roles["train"]),
                        "same_source_as_test": same_source(roles["train"], roles["test"]) if "test" in roles else [],
                        "tokens": tokens, "seconds": round(seconds, 1), "final_loss": losses[-1] if losses else None,
                        "perplexity_before": before, "perplexity_after": after}
    info["perplexity"] = {"seq_len": study.seq_len, **after}
    path = export(model, tokenizer, meta.levels, out or f"{source}-ft-{cfg.variant}", info, study.export.shard_size)
    print(f"wrote {path}: {count_params(model):,} parameters (unchanged by merging)")
    return path




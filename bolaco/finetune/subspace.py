"""Post-training inside the compressed model (docs/design.md, "Post-training"), merged back without growing it.

For a per-matrix low-rank layer y = up(down(x)) + b:
- `lora`: peft LoRA on every `down` factor (k x d_in). The update up (B A) stays in span(up) and merges into
  `down` exactly, so level map, parameter count and file size are unchanged. The plain matrices of structured
  layers (the kept rows of q/k/v, the kept columns of o, the narrower MLP) get LoRA on themselves, merged into
  them at their reduced shapes; with `lora_dense`, so do the projections the level map kept dense.
- `scaling` (Bolaco's variant, per-matrix factors only): factors frozen; a trainable length-k vector s between the
  factors and a length-d_out vector g on the output, y = g * (up(s * down(x)) + b), merged as down <- diag(s) down,
  up <- diag(g) up, b <- g * b.
- `dense`: the fair baseline, LoRA of the same rank on every projection of the *dense* model, trained with
  the same data, tokens and settings.
The loss is `ce` x next-token cross-entropy plus `distill` x KL(teacher || model) per token when a teacher
(the dense model) is given; with ce 0 it is pure distillation, whose dense baseline is the dense model itself.
Training is deterministic for a seed, and checkpoints (trainable tensors, AdamW state, losses) are written
atomically as safetensors + JSON, so an interrupted run resumes to the same loss sequence.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, adapter_for
from ..errors import BolacoError
from ..layers import ColumnsLinear, LowRankLinear, NarrowLinear, RowsLinear
from ..store import atomic_write, file_sha256
from ..study import FinetuneConfig

log = logging.getLogger(__name__)


class DiagonalScaling(nn.Module):
    """A LowRankLinear with trainable diagonal scalings between the factors and on the output."""

    def __init__(self, inner: LowRankLinear):
        super().__init__()
        self.inner = inner
        p = inner.down.weight
        self.mid = nn.Parameter(torch.ones(inner.rank, device=p.device, dtype=p.dtype))
        self.out = nn.Parameter(torch.ones(inner.out_features, device=p.device, dtype=p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out * self.inner.up(self.mid * self.inner.down(x))

    def merged(self) -> LowRankLinear:
        inner = self.inner
        with torch.no_grad():
            bias = None if inner.up.bias is None else inner.up.bias * self.out
            return LowRankLinear.from_factors(inner.down.weight * self.mid[:, None],
                                              inner.up.weight * self.out[:, None],
                                              bias, inner.dense_bias)


def compressed_ids(adapter: Adapter) -> list[str]:
    ids = [lid for lid in adapter.linears
           if isinstance(adapter.module(lid), (LowRankLinear, RowsLinear, ColumnsLinear, NarrowLinear))]
    if not ids:
        raise BolacoError("the model has no compressed layers: post-training needs a compressed model "
                          "(`make export` or `bolaco compress`)")
    return ids


def lora_target(adapter: Adapter, lid: str) -> str:
    """The plain nn.Linear that LoRA trains for linear `lid`: a low-rank layer's `down` factor, a structured
    layer's inner matrix, or the layer itself."""
    path, m = adapter.linears[lid].path, adapter.module(lid)
    if isinstance(m, LowRankLinear):
        return f"{path}.down"
    if isinstance(m, (RowsLinear, ColumnsLinear)):
        return f"{path}.linear"
    return path


class _Checkpoint:
    """Trainable tensors and AdamW state in `state-<step>.safetensors`, and `state.json` naming that file with
    its size and sha256. The JSON is replaced after the tensors are written, so a kill at any point leaves a
    consistent pair; a damaged pair is reported and training starts over (it is deterministic)."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def save(self, step: int, losses: list[float], trainable: dict[str, nn.Parameter], optimizer) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in trainable.items()}
        for i, p in enumerate(trainable.values()):
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = value.detach().cpu().reshape(-1).contiguous()
        path = self.folder / f"state-{step}.safetensors"
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
        meta = {"step": step, "losses": losses, "file": path.name, "size": path.stat().st_size,
                "sha256": file_sha256(path)}
        atomic_write(self.folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        for old in self.folder.glob("state-*.safetensors"):
            if old != path:
                old.unlink()

    def load(self, trainable: dict[str, nn.Parameter], optimizer) -> tuple[int, list[float]]:
        if self.folder is None or not (self.folder / "state.json").is_file():
            return 0, []
        from safetensors.torch import load_file
        try:
            meta = json.loads((self.folder / "state.json").read_text())
            path = self.folder / meta["file"]
            if not path.is_file() or path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
                raise ValueError(f"{path.name} does not match state.json")
            tensors = load_file(path)
            with torch.no_grad():
                for i, (n, p) in enumerate(trainable.items()):
                    p.copy_(tensors[f"param.{n}"])
                    state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
                    if state:
                        optimizer.state[p] = {k: (v.reshape(()) if k == "step" else v.reshape(p.shape)).to(p.device)
                                              for k, v in state.items()}
            return int(meta["step"]), [float(x) for x in meta["losses"]]
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            log.warning("fine-tuning checkpoint in %s is corrupt (%s): starting over from step 0", self.folder, exc)
            optimizer.state.clear()
            return 0, []


def _batch_indices(n: int, batch_size: int, micro: int, seed: int, perms: dict) -> torch.Tensor:
    """Rows of micro-batch `micro`: a fresh seeded permutation per epoch, so any step can be recomputed."""
    rows = []
    for i in range(micro * batch_size, (micro + 1) * batch_size):
        epoch, r = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(perms[epoch][r]))
    return torch.tensor(rows)


class SubspaceTuner:
    """Attach the trainable parts to a compressed model, fit them, merge them back into the factors.
    dense=True: the baseline, LoRA on every projection of a dense model (variant lora only)."""

    def __init__(self, model, cfg: FinetuneConfig, teacher=None, dense: bool = False):
        if dense and cfg.variant != "lora":
            raise BolacoError("the dense baseline is LoRA on the dense projections: use variant lora")
        if cfg.distill > 0 and teacher is None:
            raise BolacoError("finetune.distill needs the dense model as teacher")
        self.model, self.cfg, self.teacher = model, cfg, teacher
        self.adapter = adapter_for(model)
        self.ids = list(self.adapter.linears) if dense else compressed_ids(self.adapter)
        torch.manual_seed(cfg.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.variant == "lora":
            from peft import LoraConfig, get_peft_model
            targets = [lora_target(self.adapter, lid) for lid in self.ids]
            if not dense and cfg.lora_dense:   # the projections kept dense: plain LoRA, merged into the weight
                targets += [info.path for lid, info in self.adapter.linears.items() if lid not in self.ids]
            self.net = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                        target_modules=targets, bias="none"))
        else:
            self.ids = [lid for lid in self.ids if isinstance(self.adapter.module(lid), LowRankLinear)]
            if not self.ids:
                raise BolacoError("finetune.variant scaling trains the scalings of per-matrix factors, and this model "
                                  "has none (structured modules): use finetune.variant lora")
            for lid in self.ids:
                self.adapter.replace(lid, DiagonalScaling(cast(LowRankLinear, self.adapter.module(lid))))
            self.net = model
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        self.trainable = {n: p for n, p in self.net.named_parameters() if p.requires_grad}

    def fit(self, sequences: torch.Tensor, checkpoint: Path | None = None, progress: bool = True) -> list[float]:
        """Train on `sequences` (N, seq_len); returns the loss of every optimizer step (resumed ones included)."""
        from transformers import get_scheduler
        cfg, net = self.cfg, self.net
        device = next(net.parameters()).device
        optimizer = torch.optim.AdamW(self.trainable.values(), lr=cfg.lr, weight_decay=0.0)
        scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
        store = _Checkpoint(checkpoint)
        start, losses = store.load(self.trainable, optimizer)
        with warnings.catch_warnings():   # fast-forwarding a resumed schedule steps it before the optimizer, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for _ in range(start):
                scheduler.step()
        # bfloat16 autocast on a GPU (LoRA's own weights stay float32: peft's autocast_adapter_dtype)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        perms: dict = {}
        net.train()
        bar = tqdm(total=cfg.steps, initial=start, desc=f"finetune ({cfg.variant})", disable=not progress)
        t0, tokens = time.perf_counter(), 0
        try:
            for step in range(start, cfg.steps):
                loss_sum = 0.0
                for j in range(cfg.grad_accum):
                    rows = _batch_indices(len(sequences), cfg.batch_size, step * cfg.grad_accum + j, cfg.seed, perms)
                    batch = sequences[rows].to(device)
                    with autocast:
                        out = net(input_ids=batch, labels=batch if cfg.ce > 0 else None, use_cache=False)
                        loss = cfg.ce * out.loss if cfg.ce > 0 else out.logits.new_zeros(())
                        if self.teacher is not None and cfg.distill > 0:
                            loss = loss + cfg.distill * self._kl_to_teacher(batch, out.logits)
                        loss = loss / cfg.grad_accum
                    loss.backward()
                    loss_sum += float(loss.detach())
                    tokens += batch.numel()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss_sum)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                    store.save(step + 1, losses, self.trainable, optimizer)
        finally:
            bar.close()
            net.eval()
        return losses

    def _kl_to_teacher(self, batch: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Mean per-token KL(teacher || model), the teacher's logits computed on the fly."""
        with torch.no_grad():
            ref = torch.log_softmax(self.teacher(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return (ref.exp() * (ref - logp)).sum(-1).mean()

    def merge(self):
        """Fold the trained parts into the factors; returns the plain compressed model (same ranks and size)."""
        if self.cfg.variant == "lora":
            return self.net.merge_and_unload()
        for lid in self.ids:
            self.adapter.replace(lid, self.adapter.module(lid).merged())
        return self.model

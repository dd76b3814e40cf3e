"""Export and load compressed models (DESIGN 2.9): safetensors + JSON only, really smaller on disk.

An exported directory holds `model.safetensors` (factors of the low-rank layers and the remaining
dense weights; tied weights stored once) or, above the shard size, `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json` (Hugging Face's layout), the base architecture's `config.json`,
`bolaco.json` (rank map, method, budget, provenance) and the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import __version__
from .arch import adapter_for
from .budget import RankMap
from .decompose import LowRankLinear
from .errors import BolacoError

FORMAT = 1
INDEX = "model.safetensors.index.json"


def _load_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The state dict of model.safetensors, or of every shard named by the index."""
    if weights.name != INDEX:
        return load_file(weights)
    try:
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError) as exc:
        raise BolacoError(f"{weights} is corrupt ({exc}): export the model again")
    state = {}
    for shard in shards:
        state.update(load_file(weights.parent / shard))
    return state


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the model, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (the first name wins)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else name
        if key not in seen:
            seen.add(key)
            t = t.detach().contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():   # a slice of the cached factors
                t = t.clone()
            out[name] = t
    return out


def export(model, tokenizer, ranks: RankMap, out_dir: str | Path, info: dict, shard_size: str | int = "5GB") -> Path:
    """Write the model as it is now (its low-rank layers must carry `ranks`) to `out_dir`, in safetensors
    shards of at most `shard_size`."""
    adapter = adapter_for(model)
    lowrank = {lid for lid in adapter.linears if isinstance(adapter.module(lid), LowRankLinear)}
    if lowrank != set(ranks):
        raise BolacoError("the model's low-rank layers do not match the rank map to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)      # a dequantized GGUF model is a plain float model now
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    for old in [*out.glob("model*.safetensors"), out / INDEX]:   # a previous export with other sharding
        old.unlink(missing_ok=True)
    save_torch_state_dict(_unique_state(model), out, max_shard_size=shard_size, metadata={"format": "pt"})
    biased = sorted(lid for lid in ranks if adapter.module(lid).up.bias is not None)
    dense_biased = sorted(lid for lid, li in adapter.linears.items() if li.bias)
    meta = {"format": FORMAT, "bolaco_version": __version__, "ranks": ranks, "lowrank_bias": biased,
            "dense_bias": dense_biased,
            "params": count_params(model), **info}
    (out / "bolaco.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_compressed(path: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """Rebuild an exported model: the base architecture with LowRankLinear layers, weights from safetensors."""
    path = Path(path)
    meta_path = path / "bolaco.json"
    weights = path / INDEX if (path / INDEX).is_file() else path / "model.safetensors"
    for f in (meta_path, weights, path / "config.json"):
        if not f.is_file():
            raise BolacoError(f"{path} is not a bolaco export: {f.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        ranks, biased, dense_biased = meta["ranks"], set(meta["lowrank_bias"]), set(meta["dense_bias"])
    except (json.JSONDecodeError, KeyError) as exc:
        raise BolacoError(f"{meta_path} is corrupt ({exc}): export the model again")
    if meta.get("format") != FORMAT:
        raise BolacoError(f"{path} was written in bolaco export format {meta.get('format')}; this bolaco reads {FORMAT}")
    config = AutoConfig.from_pretrained(path)
    state = _load_weights(weights)
    dtype = dtype or next(iter(state.values())).dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    for lid, k in ranks.items():
        li = adapter.linears[lid]
        adapter.replace(lid, LowRankLinear(li.d_in, li.d_out, k, lid in biased, lid in dense_biased, device="meta",
                                           dtype=dtype))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_empty:
        raise BolacoError(f"{weights} does not match its bolaco.json (unexpected {unexpected[:3]}, "
                          f"missing {still_empty[:3]}): export the model again")
    model.eval()
    if device:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer


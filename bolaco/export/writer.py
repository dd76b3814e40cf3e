"""Export and load compressed models (DESIGN 2.9): safetensors + JSON only, really smaller on disk.

An exported directory holds `model.safetensors` (factors of the low-rank layers and the remaining
dense weights; tied weights stored once) or, above the shard size, `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json` (Hugging Face's layout), `config.json`, `modeling_bolaco.py`,
`bolaco.json` (rank map, method, budget, provenance) and the tokenizer.

config.json is the base architecture's with model_type "bolaco", the low-rank layers and an `auto_map` to
modeling_bolaco.py (bolaco.layers plus a subclass of the base model that puts those layers in place). So
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the right model without bolaco,
and plain loading without trust_remote_code fails loudly instead of building the dense architecture with
random projections.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from .. import layers
from .._version import __version__
from ..arch import adapter_for
from ..decompose import RankMap
from .card import write_card
from ..errors import BolacoError
from ..heatmap import keep_heatmap
from ..layers import LowRankLinear, fuse_shared_inputs

FORMAT = 2
INDEX = "model.safetensors.index.json"
MODEL_TYPE = "bolaco"
MODELING = "modeling_bolaco.py"

_MODELING_CLASSES = '''

from transformers import {config_class} as _BaseConfig, {model_class} as _BaseModel


class BolacoConfig(_BaseConfig):
    """The base architecture's configuration; `bolaco` holds the low-rank layers {{path: [rank, bias]}}."""
    model_type = "{model_type}"


class BolacoForCausalLM(_BaseModel):
    """The base model with its compressed projections replaced by LowRankLinear before the weights load."""
    config_class = BolacoConfig

    def __init__(self, config):
        super().__init__(config)
        for path, (rank, bias) in config.bolaco["layers"].items():
            dense = self.get_submodule(path)
            parent, _, name = path.rpartition(".")
            setattr(self.get_submodule(parent), name,
                    LowRankLinear(dense.in_features, dense.out_features, rank, bias, dense.bias is not None,
                                  device=dense.weight.device, dtype=dense.weight.dtype))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The loaded model, with the down factors of the layers that read one input stacked (fuse_shared_inputs)."""
        model = super().from_pretrained(*args, **kwargs)
        fuse_shared_inputs(model, model.config.bolaco.get("shared_inputs", []))
        return model
'''


@dataclass(frozen=True)
class ExportMeta:
    """bolaco.json, in export format FORMAT: what loading needs (the rank map, which factors carry a bias, the
    parameter count) and `info`, what the stage that wrote the export records (method, budget, refit,
    perplexity, provenance, allocation, post-training). Only `export` writes it; `read` checks it."""
    ranks: dict[str, int]
    lowrank_bias: list[str]
    dense_bias: list[str]
    params: int
    info: dict = field(default_factory=dict)
    format: int = FORMAT
    bolaco_version: str = __version__

    def to_json(self) -> dict:
        core = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "info"}
        return {**self.info, **core}

    @classmethod
    def read(cls, folder: Path) -> "ExportMeta":
        path = folder / "bolaco.json"
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BolacoError(f"{path} is not valid JSON ({exc}): export the model again")
        if not isinstance(raw, dict):
            raise BolacoError(f"{path} must hold a JSON object: export the model again")
        if raw.get("format") != FORMAT:
            raise BolacoError(f"{folder} was written in bolaco export format {raw.get('format')}; this bolaco reads "
                              f"{FORMAT}: export the model again with this version")
        ranks = raw.get("ranks")
        if not isinstance(ranks, dict) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                  for k in ranks.values()):
            raise BolacoError(f"{path}: 'ranks' must map layer ids to integer ranks, e.g. {{\"0.q\": 64}}: "
                              "export the model again")
        for key in ("lowrank_bias", "dense_bias"):
            if not isinstance(raw.get(key), list) or not all(isinstance(x, str) for x in raw[key]):
                raise BolacoError(f"{path}: '{key}' must be a list of layer ids: export the model again")
        if not isinstance(raw.get("params"), int):
            raise BolacoError(f"{path}: 'params' must be an integer: export the model again")
        core = {f.name for f in fields(cls)} - {"info"}
        return cls(**{k: raw[k] for k in core}, info={k: v for k, v in raw.items() if k not in core})


def _weight_files(weights: Path) -> list[Path]:
    """model.safetensors, or every shard named by the index."""
    if weights.name != INDEX:
        return [weights]
    try:
        return [weights.parent / f for f in sorted(set(json.loads(weights.read_text())["weight_map"].values()))]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BolacoError(f"{weights} is corrupt ({exc}): export the model again")


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


def shared_input_groups(adapter, lowrank) -> list[list[str]]:
    """Module paths of the low-rank layers that read one input, per block and record (q, k, v; gate, up)."""
    groups = ([adapter.linears[lid].path for lid in lids if lid in lowrank]
              for b in range(adapter.n_blocks) for lids in adapter.block_records(b).values())
    return [g for g in groups if len(g) > 1]


def export(model, tokenizer, ranks: RankMap, out_dir: str | Path, info: dict, shard_size: str | int = "5GB") -> Path:
    """Write the model as it is now (its low-rank layers must carry `ranks`) to `out_dir`, in safetensors
    shards of at most `shard_size`."""
    adapter = adapter_for(model)
    lowrank = {lid: m for lid in adapter.linears if isinstance(m := adapter.module(lid), LowRankLinear)}
    if set(lowrank) != set(ranks):
        raise BolacoError("the model's low-rank layers do not match the rank map to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)      # a dequantized GGUF model is a plain float model now
    config.pop("_name_or_path", None)
    config.update(model_type=MODEL_TYPE, architectures=["BolacoForCausalLM"],
                  auto_map={"AutoConfig": "modeling_bolaco.BolacoConfig",
                            "AutoModelForCausalLM": "modeling_bolaco.BolacoForCausalLM"},
                  bolaco={"base_model_type": model.config.model_type,
                          "layers": {adapter.linears[lid].path: [k, lowrank[lid].up.bias is not None]
                                     for lid, k in sorted(ranks.items())},
                          "shared_inputs": shared_input_groups(adapter, lowrank)})
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    (out / MODELING).write_text(f"# Written by bolaco {__version__}: the model of this folder for "
                                "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).\n"
                                + inspect.getsource(layers) + _MODELING_CLASSES.format(
                                    config_class=type(model.config).__name__, model_class=type(model).__name__,
                                    model_type=MODEL_TYPE))
    for old in [*out.glob("model*.safetensors"), out / INDEX]:   # a previous export with other sharding
        old.unlink(missing_ok=True)
    save_torch_state_dict(_unique_state(model), out, max_shard_size=shard_size, metadata={"format": "pt"})
    biased = sorted(lid for lid in ranks if lowrank[lid].up.bias is not None)
    dense_biased = sorted(lid for lid, li in adapter.linears.items() if li.bias)
    meta = ExportMeta(dict(ranks), biased, dense_biased, count_params(model), dict(info)).to_json()
    (out / "bolaco.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    keep = {lid: sum(p.numel() for p in adapter.module(lid).parameters()) /
            (li.d_in * li.d_out + (li.d_out if li.bias else 0)) for lid, li in adapter.linears.items()}
    write_card(out, meta, keep, keep_heatmap(keep, adapter.types, adapter.n_blocks))
    return out


def _header_shapes(weights: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for f in _weight_files(weights):
        try:
            with safe_open(f, framework="pt") as handle:
                shapes.update({k: handle.get_slice(k).get_shape() for k in handle.keys()})
        except Exception as exc:   # safetensors raises its own error types for damaged headers
            raise BolacoError(f"{f} is not a readable safetensors file ({str(exc).splitlines()[0]}): "
                              "export the model again")
    return shapes


def _check_against_weights(meta: ExportMeta, adapter, shapes: dict[str, list[int]], where: Path) -> None:
    """Every rank, bias and layer id of bolaco.json agrees with the tensors stored."""
    for lid, k in meta.ranks.items():
        if lid not in adapter.linears:
            raise BolacoError(f"{where}: '{lid}' is not a projection of this {adapter.family} model "
                              f"(ids look like {next(iter(adapter.linears))}): export the model again")
        li = adapter.linears[lid]
        down, up = shapes.get(f"{li.path}.down.weight"), shapes.get(f"{li.path}.up.weight")
        if down is None or up is None:
            raise BolacoError(f"{where}: '{lid}' is listed as low-rank but the weights hold no factors for it: "
                              "export the model again")
        if down != [k, li.d_in] or up != [li.d_out, k]:
            raise BolacoError(f"{where}: the rank of '{lid}' is {k} but the weights store {down[0]}: "
                              "export the model again")
        if (f"{li.path}.up.bias" in shapes) != (lid in meta.lowrank_bias):
            raise BolacoError(f"{where}: the bias of '{lid}' does not match the weights: export the model again")


def base_config(path: Path):
    """The base architecture's configuration of an export."""
    try:
        raw = json.loads((path / "config.json").read_text())
        base = raw["bolaco"]["base_model_type"]
    except (json.JSONDecodeError, KeyError, TypeError):
        base = None
    if base not in CONFIG_MAPPING or raw.get("model_type") != MODEL_TYPE:
        raise BolacoError(f"{path / 'config.json'} is not a bolaco export's configuration: export the model again")
    for key in ("auto_map", "bolaco", "architectures"):
        raw.pop(key)
    raw["model_type"] = base
    return CONFIG_MAPPING[base].from_dict(raw)


def load_compressed(path: str | Path, device: str | None = None, dtype: torch.dtype | None = None, fuse: bool = True):
    """Rebuild an exported model: the base architecture with LowRankLinear layers, weights from safetensors.
    bolaco.json is checked against the safetensors headers first, so an edited file gets a one-line error.
    `fuse`: the down factors of the layers that read one input are stacked into one product (fuse_shared_inputs;
    the same logits); turn it off for a model that will be trained or moved to another device after loading."""
    path = Path(path)
    weights = path / INDEX if (path / INDEX).is_file() else path / "model.safetensors"
    for f in (path / "bolaco.json", weights, path / "config.json"):
        if not f.is_file():
            raise BolacoError(f"{path} is not a bolaco export: {f.name} is missing")
    meta = ExportMeta.read(path)
    shapes = _header_shapes(weights)
    config = base_config(path)
    state = {k: v for f in _weight_files(weights) for k, v in load_file(f).items()}
    dtype = dtype or next(iter(state.values())).dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    _check_against_weights(meta, adapter, shapes, path / "bolaco.json")
    biased, dense_biased = set(meta.lowrank_bias), set(meta.dense_bias)
    for lid, k in meta.ranks.items():
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
    if fuse:
        fuse_shared_inputs(model, shared_input_groups(adapter, meta.ranks))
    # the base configuration: AutoTokenizer would otherwise ask to run the folder's modeling code
    tokenizer = AutoTokenizer.from_pretrained(path, config=config) if (path / "tokenizer_config.json").is_file() \
        else None
    return model, tokenizer

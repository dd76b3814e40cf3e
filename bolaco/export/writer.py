"""Export and load compressed models (docs/design.md, "Export and load"): safetensors + JSON only, really smaller on
disk, written atomically, verified when loaded.

An exported folder holds `model.safetensors` (the layers of the compressed units and the remaining dense weights;
tied weights stored once) or, above the shard size, Hugging Face's `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`; `config.json` (the base architecture's, with model type "bolaco", a "bolaco"
section listing the compressed layers by kind and shape, and an `auto_map` to `modeling_bolaco.py`, which is
bolaco.layers with the lines that build the model class); `generation_config.json`; the tokenizer; `bolaco.json`
(the level map, the parameter count, the sha256 of every weight file, the methods, budget, selection and
provenance); and a model card (README.md). So `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
loads the right model without bolaco, and plain loading without trust_remote_code fails loudly instead of
building the dense architecture with random projections.

The folder is written beside its destination and renamed into place when complete, so a crash leaves the previous
export (or none), never half of one. `load_compressed` reads nothing outside the folder, checks every weight file
against bolaco.json's sha256 (remembered per file size and mtime) and loads through the model class's own
`from_pretrained`, so dtype and device_map work as they do for any transformers model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from transformers import CONFIG_MAPPING, AutoTokenizer

from .._version import __version__
from ..arch import adapter_for
from ..calibrate import check_disk
from ..decompose import Budget, LevelMap
from ..errors import BolacoError
from ..layers import (EXPORT_FORMAT, MODEL_TYPE, MODELING_FILE, WEIGHTS_INDEX, LowRankLinear, build_layer,
                      compressed_model_class, file_digest, fuse_shared_inputs, layer_spec, modeling_source,
                      shard_digests, weight_files)
from ..model import torch_dtype
from .card import write_card

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportMeta:
    """bolaco.json, in export format EXPORT_FORMAT: what verifying needs (the level map, the parameter count, the
    size and sha256 of every weight file) and `info`, what the stage that wrote the export records (methods,
    budget, refit, selection, perplexity, provenance, allocation, post-training). `export` writes it; `read`
    checks it."""
    levels: dict[str, int]
    params: int
    shards: dict[str, dict]
    info: dict = field(default_factory=dict)
    format: int = EXPORT_FORMAT
    bolaco_version: str = __version__

    def to_json(self) -> dict:
        core = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "info"}
        return {**self.info, **core}

    @classmethod
    def read(cls, folder: Path) -> "ExportMeta":
        path = folder / "bolaco.json"
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BolacoError(f"{path} is not valid JSON ({exc}): export the model again")
        if not isinstance(raw, dict):
            raise BolacoError(f"{path} must hold a JSON object: export the model again")
        if raw.get("format") != EXPORT_FORMAT:
            raise BolacoError(f"{folder} was written in bolaco export format {raw.get('format')}; this bolaco reads "
                              f"{EXPORT_FORMAT}: export the model again with this version")
        levels = raw.get("levels")
        if not isinstance(levels, dict) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                   for k in levels.values()):
            raise BolacoError(f"{path}: 'levels' must map unit ids to integer levels, e.g. {{\"0.q\": 64}}: "
                              "export the model again")
        if not isinstance(raw.get("params"), int) or isinstance(raw.get("params"), bool):
            raise BolacoError(f"{path}: 'params' must be an integer: export the model again")
        shards = raw.get("shards")
        if not isinstance(shards, dict) or not all(isinstance(v, dict) and isinstance(v.get("size"), int)
                                                   and isinstance(v.get("sha256"), str) for v in shards.values()):
            raise BolacoError(f"{path}: 'shards' must give the size and sha256 of every weight file: export the "
                              "model again")
        core = {f.name for f in fields(cls)} - {"info"}
        return cls(**{k: raw[k] for k in core if k in raw}, info={k: v for k, v in raw.items() if k not in core})


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
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():   # a slice of a larger tensor
                t = t.clone()
            out[name] = t
    return out


def shared_input_groups(adapter, lowrank) -> list[list[str]]:
    """Module paths of the low-rank layers that read one input, per block and record (q, k, v; gate, up)."""
    groups = ([adapter.linears[lid].path for lid in lids if lid in lowrank]
              for b in range(adapter.n_blocks) for lids in adapter.block_records(b).values())
    return [g for g in groups if len(g) > 1]


def _base_architecture(model) -> tuple[type, Any]:
    """(model class, config class) of the transformers architecture under `model`: for a model loaded from an
    export (e.g. post-trained and exported again) the one its BolacoForCausalLM was built on, not that class."""
    if model.config.model_type == MODEL_TYPE:
        return type(model).__bases__[0], type(model.config).__bases__[0]
    return type(model), type(model.config)


def _config(model, adapter, levels: LevelMap) -> dict:
    """config.json: the base architecture's, marked as a bolaco export, with the compressed layers."""
    replaced = {li.path: m for lid, li in adapter.linears.items()
                if type(m := adapter.module(lid)) is not torch.nn.Linear}
    lowrank = {lid for lid, li in adapter.linears.items() if isinstance(replaced.get(li.path), LowRankLinear)}
    base_model, base_config = _base_architecture(model)
    config = model.config.to_dict()
    config.pop("quantization_config", None)      # a dequantized GGUF model is a plain float model now
    config.pop("_name_or_path", None)
    config.update(model_type=MODEL_TYPE, architectures=["BolacoForCausalLM"],
                  dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  auto_map={"AutoConfig": "modeling_bolaco.BolacoConfig",
                            "AutoModelForCausalLM": "modeling_bolaco.BolacoForCausalLM"},
                  bolaco={"format": EXPORT_FORMAT, "base_model_type": base_config.model_type,
                          "base_class": base_model.__name__, "levels": dict(sorted(levels.items())),
                          "layers": {path: layer_spec(m) for path, m in sorted(replaced.items())},
                          "shared_inputs": shared_input_groups(adapter, lowrank)})
    return config


def _write(model, tokenizer, config: dict, out: Path, shard_size: str | int) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    (out / MODELING_FILE).write_text(f"# Written by bolaco {__version__}: the model of this folder for "
                                     "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).\n"
                                     + modeling_source(*_base_architecture(model)))
    save_torch_state_dict(_unique_state(model), out, max_shard_size=shard_size, metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None:       # the base model's eos ids and sampling defaults
        generation.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` where `out` is, the previous one removed only once the new one is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(model, tokenizer, levels: LevelMap, out_dir: str | Path, info: dict, shard_size: str | int = "5GB",
           unit_types: tuple[str, ...] = (), budget: Budget | None = None) -> Path:
    """Write the model as it is now (it must carry `levels`) to `out_dir`, in safetensors shards of at most
    `shard_size`, atomically. `unit_types` and `budget` draw the card's allocation heat map."""
    adapter = adapter_for(model)
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(t.numel() * t.element_size() for t in _unique_state(model).values())
    check_disk(out.parent, int(weights * 1.05) + (64 << 20), "export")
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)     # left by an export that was killed
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        config = _config(model, adapter, levels)
        _write(model, tokenizer, config, tmp, shard_size)
        meta = ExportMeta(dict(levels), count_params(model), shard_digests(tmp), dict(info)).to_json()
        (tmp / "bolaco.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        keep = {lid: sum(p.numel() for p in adapter.module(lid).parameters()) /
                (li.d_in * li.d_out + (li.d_out if li.bias else 0)) for lid, li in adapter.linears.items()}
        write_card(tmp, meta, keep, adapter, budget, unit_types, levels)
        _replace_folder(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BolacoError(f"cannot write the export {out} ({exc.strerror or exc}): free some space or choose "
                          "another folder with --out")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused when it would lead outside the folder (an index naming ../ or absolute paths)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()) or path.parent != folder.resolve():
        raise BolacoError(f"{folder}: the weight file name {name!r} points outside the export: refused "
                          "(export the model again, or get it from its source)")
    return path


_VERIFIED = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bolaco" / "verified.json"


def _verify_weights(folder: Path, meta: ExportMeta) -> None:
    """Every weight file is inside the folder and has the size and sha256 bolaco.json records. A file whose
    (path, size, mtime) was verified before is not hashed again."""
    try:
        files = weight_files(folder)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise BolacoError(f"{folder / WEIGHTS_INDEX} is corrupt ({exc}): export the model again")
    if sorted(files) != sorted(meta.shards):
        raise BolacoError(f"{folder}: the weight files ({', '.join(files)}) are not the ones bolaco.json lists "
                          f"({', '.join(meta.shards)}): export the model again")
    try:
        known = json.loads(_VERIFIED.read_text())
    except (OSError, ValueError):
        known = {}
    changed = False
    for name in files:
        path = _inside(folder, name)
        if not path.is_file():
            raise BolacoError(f"{folder}: the weight file {name} is missing: export the model again")
        stat, want = path.stat(), meta.shards[name]
        stamp = [stat.st_size, stat.st_mtime_ns, want["sha256"]]
        if known.get(str(path)) == stamp:
            continue
        if stat.st_size != want["size"] or file_digest(path) != want["sha256"]:
            raise BolacoError(f"{path} is damaged: its size or sha256 differs from what bolaco.json records "
                              "(export the model again, or copy it again from its source)")
        known[str(path)], changed = stamp, True
    if changed:
        try:
            _VERIFIED.parent.mkdir(parents=True, exist_ok=True)
            _VERIFIED.write_text(json.dumps(known))
        except OSError:   # a read-only home only costs the next load a hash
            pass


def _check_layers(folder: Path, config: dict, meta: ExportMeta) -> None:
    """config.json's layers agree with the tensors stored and bolaco.json's level map with the layers."""
    shapes = {}
    for name in weight_files(folder):
        try:
            with safe_open(_inside(folder, name), framework="pt") as handle:
                shapes.update({k: handle.get_slice(k).get_shape() for k in handle.keys()})
        except BolacoError:
            raise
        except Exception as exc:   # safetensors raises its own error types for damaged headers
            raise BolacoError(f"{folder / name} is not a readable safetensors file ({str(exc).splitlines()[0]}): "
                              "export the model again")
    layers = config["bolaco"]["layers"]
    for path, spec in layers.items():
        try:
            empty = build_layer(spec, device="meta")
        except (KeyError, TypeError, ValueError) as exc:
            raise BolacoError(f"{folder / 'config.json'}: the layer {path} is not described right ({exc}): "
                              "export the model again")
        for name, t in empty.state_dict().items():
            if shapes.get(f"{path}.{name}") != list(t.shape):
                raise BolacoError(f"{folder}: the weights of {path} do not match config.json ({name} is "
                                  f"{shapes.get(f'{path}.{name}')}, config.json says {list(t.shape)}): export the "
                                  "model again")
    if meta.levels != config["bolaco"].get("levels"):
        raise BolacoError(f"{folder / 'bolaco.json'}: the level map differs from config.json's: export the model "
                          "again")


def read_config(folder: Path) -> dict:
    """config.json of an export (one line when it is not one)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        base = config["bolaco"]["base_model_type"]
        assert config["bolaco"].get("format") == EXPORT_FORMAT and isinstance(config["bolaco"]["layers"], dict)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise BolacoError(f"{folder / 'config.json'} is not the configuration of a bolaco export of this version: "
                          "export the model again")
    if base not in CONFIG_MAPPING or config.get("model_type") != MODEL_TYPE:
        raise BolacoError(f"{folder / 'config.json'} is not a bolaco export's configuration: export the model again")
    return config


def model_classes(config: dict) -> tuple[Any, Any]:
    """(config class, model class) of an export, built from bolaco's own code (the folder's is never run)."""
    base_config = CONFIG_MAPPING[config["bolaco"]["base_model_type"]]
    base_model = getattr(transformers, str(config["bolaco"].get("base_class")), None)
    if not (isinstance(base_model, type) and issubclass(base_model, transformers.PreTrainedModel)):
        raise BolacoError(f"config.json names an unknown model class {config['bolaco'].get('base_class')!r}: "
                          "export the model again")
    return compressed_model_class(base_model, base_config)


def is_export(path) -> bool:
    """A folder bolaco wrote (or began to write): it holds bolaco.json, or a config.json of model type bolaco."""
    if path is None:
        return False
    folder = Path(str(path)).expanduser()
    if (folder / "bolaco.json").is_file():
        return True
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_compressed(path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
                    device_map: str | dict | None = None, fuse: bool = True):
    """Load an exported model and its tokenizer: the base architecture with bolaco's layers, through
    `from_pretrained` (dtype: a torch dtype or its name, default the stored one; device_map: as for any transformers
    model). The folder is verified first: no file outside it is read, every weight file must match bolaco.json's
    sha256, and config.json's layers must match the stored tensors. `fuse`: stack the down factors of the low-rank
    layers that read one input (the same logits); it follows the weights wherever they go (bolaco.layers)."""
    folder = Path(path).expanduser()
    for name in ("bolaco.json", "config.json"):
        if not (folder / name).is_file():
            raise BolacoError(f"{folder} is not a complete bolaco export: {name} is missing (export the model again)")
    meta = ExportMeta.read(folder)
    config = read_config(folder)
    _verify_weights(folder, meta)
    _check_layers(folder, config, meta)
    config_cls, model_cls = model_classes(config)
    cfg = config_cls.from_dict({k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
    kwargs = {"device_map": device_map} if device_map is not None else {}
    model, info = model_cls.from_pretrained(folder, config=cfg, dtype=torch_dtype(dtype or config["dtype"]),
                                            fuse=False, output_loading_info=True, **kwargs)
    if info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise BolacoError(f"{folder}: the weights do not match config.json (missing "
                          f"{sorted(info['missing_keys'])[:3]}, "
                          f"unexpected {sorted(info['unexpected_keys'])[:3]}): export the model again")
    if count_params(model) != meta.params:
        raise BolacoError(f"{folder / 'bolaco.json'}: 'params' is {meta.params:,} but the model has "
                          f"{count_params(model):,}: export the model again")
    model.eval()
    if device and device_map is None:
        model.to(device)
    if fuse:
        fuse_shared_inputs(model, config["bolaco"].get("shared_inputs", []))
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        # the base configuration: AutoTokenizer would otherwise ask to run the folder's modeling code
        tokenizer = AutoTokenizer.from_pretrained(folder, config=CONFIG_MAPPING[config["bolaco"]["base_model_type"]]())
    return model, tokenizer

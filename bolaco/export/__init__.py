"""Stage 5, the export (docs/design.md, "Export and load"): safetensors shards, config.json with an auto_map to the
shipped modeling file, generation config, tokenizer, bolaco.json (`ExportMeta`) and a model card, written
atomically; `load_compressed` verifies and reads it back through `from_pretrained`."""

from .writer import ExportMeta, count_params, export, is_export, load_compressed

__all__ = ["ExportMeta", "count_params", "export", "is_export", "load_compressed"]

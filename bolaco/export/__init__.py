"""Stage 5, the export (DESIGN 2.9): factors as safetensors (sharded when large), config.json with an auto_map to
the shipped modeling file, bolaco.json (`ExportMeta`), the model card; `load_compressed` reads it back."""

from .writer import ExportMeta, count_params, export, load_compressed

__all__ = ["ExportMeta", "count_params", "export", "load_compressed"]

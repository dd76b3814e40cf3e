"""The allocation heat map: the share of parameters kept per (layer, type), drawn for the dashboard, the report
and the model card."""

from __future__ import annotations

import io


def keep_heatmap(keep: dict[str, float], types: tuple[str, ...], n_blocks: int, title: str = "") -> bytes:
    """PNG of the share of parameters kept per (layer, type): keep maps "block.type" to a fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [[keep[f"{b}.{t}"] for b in range(n_blocks)] for t in types]
    fig, ax = plt.subplots(figsize=(max(4, n_blocks * 0.22 + 1.5), 2.6), dpi=100)
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("layer")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="kept")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

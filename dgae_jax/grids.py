"""Image grids for TensorBoard and PNG files."""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image


def image_grid(rows: np.ndarray, pad: int = 2) -> np.ndarray:
    """(R, N, H, W, 3) uint8 -> one (R*(H+pad)-pad, N*(W+pad)-pad, 3) image, white gaps."""
    r, n, h, w, c = rows.shape
    grid = np.full((r * (h + pad) - pad, n * (w + pad) - pad, c), 255, np.uint8)
    for i in range(r):
        for j in range(n):
            grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = rows[i, j]
    return grid


def metric_panels(count: int):
    """A matplotlib Figure with `count` panels side by side and its axes, drawn on the Agg canvas
    directly (no pyplot, so no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * count, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, count, squeeze=False)[0]


def panels_png(fig, axes, title: str = "") -> bytes:
    """The legend in the first panel, the title, and the figure as PNG bytes."""
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_png(image: np.ndarray, path: epath.Path) -> None:
    """Writes a PNG locally or to a bucket (epath)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())

"""Galleries of galaxy stamps as PNG files (matplotlib, no display needed)."""

import numpy as np

from .errors import VQVAEInputError
from .fileio import atomic_path


def save_gallery(path, columns, title=None, stretch="asinh", panel_size=1.4):
    """Save a grid of stamps: one column per named array, one row per stamp.

    Each row shares one colour scale (from its first column's robust range, widened to the
    row's brightest pixel), so that the columns of a row compare directly.

    Parameters:
        path:       Output PNG path (written atomically).
        columns:    dict column name -> array [n, S, S]; all n equal (S may differ).
        title:      Figure title. [default: None]
        stretch:    ``"asinh"`` (shows faint outskirts) or ``"linear"``. [default: "asinh"]
        panel_size: Inches per panel. [default: 1.4]
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if not columns:
        raise VQVAEInputError("save_gallery needs at least one column")
    arrays = {name: np.asarray(a, dtype=np.float64) for name, a in columns.items()}
    n = {name: (a.shape[0] if a.ndim == 3 else -1) for name, a in arrays.items()}
    if any(v < 1 for v in n.values()) or len(set(n.values())) != 1:
        raise VQVAEInputError(f"gallery columns must be arrays [n, S, S] with one n, got shapes "
                              f"{ {k: a.shape for k, a in arrays.items()} }")
    if stretch not in ("asinh", "linear"):
        raise VQVAEInputError(f"stretch must be 'asinh' or 'linear', got {stretch!r}")
    rows, cols = next(iter(n.values())), len(arrays)
    fig = Figure(figsize=(panel_size * cols, panel_size * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        row = [a[r] for a in arrays.values()]
        lo = float(np.percentile(row[0], 5))
        hi = max(float(np.max(p)) for p in row)
        soft = max(float(np.percentile(row[0], 99)) - lo, 1e-30) * 0.05
        for c, (name, img) in enumerate(zip(arrays, row)):
            if stretch == "asinh":
                shown = np.arcsinh((img - lo) / soft)
                vmin, vmax = 0.0, np.arcsinh(max(hi - lo, soft) / soft)
            else:
                shown, vmin, vmax = img, lo, hi
            ax = axes[r, c]
            ax.imshow(shown, origin="lower", cmap="magma", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)

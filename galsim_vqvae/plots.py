"""Galleries of galaxy stamps as PNG files (matplotlib, no display needed)."""

import math

import numpy as np

from .errors import VQVAEInputError
from .extras import require
from .fileio import atomic_path


def save_gallery(path, columns, title=None, stretch="asinh", panel_size=1.4, per_row=None):
    """Save a gallery of stamps: a grid of galaxies, each shown once per named array (e.g. held-out
    truth beside a sample), the grid about as wide as it is tall.

    The panels of one galaxy share one colour scale (from its first array's robust range, widened
    to the brightest pixel of its panels), so that they compare directly.

    Parameters:
        path:       Output PNG path (written atomically).
        columns:    dict name -> array [n, S, S]; all n equal (S may differ).
        title:      Figure title. [default: None]
        stretch:    ``"asinh"`` (shows faint outskirts) or ``"linear"``. [default: "asinh"]
        panel_size: Inches per panel (at 100 dpi). [default: 1.4]
        per_row:    Galaxies per row of the grid. [default: about sqrt(n / len(columns))]
    """
    require("matplotlib")
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
    count, group = next(iter(n.values())), len(arrays)
    per_row = per_row or max(1, round(math.sqrt(count / group)))
    per_row = min(per_row, count)
    rows = -(-count // per_row)
    fig = Figure(figsize=(panel_size * per_row * group, panel_size * rows + 0.4))
    axes = fig.subplots(rows, per_row * group, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k in range(count):
        panels = [a[k] for a in arrays.values()]
        lo = float(np.percentile(panels[0], 5))
        hi = max(float(np.max(p)) for p in panels)
        soft = max(float(np.percentile(panels[0], 99)) - lo, 1e-30) * 0.05
        for c, (name, img) in enumerate(zip(arrays, panels)):
            if stretch == "asinh":
                shown = np.arcsinh((img - lo) / soft)
                vmin, vmax = 0.0, np.arcsinh(max(hi - lo, soft) / soft)
            else:
                shown, vmin, vmax = img, lo, hi
            ax = axes[k // per_row, (k % per_row) * group + c]
            ax.imshow(shown, origin="lower", cmap="magma", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
            if k < per_row and group > 1:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# ------------------------------------------------------------------------------------------------
# Figures of the science report (galsim-vqvae evaluate)
def _grid(n_panels, panel_size=(3.2, 2.6), columns=4):
    require("matplotlib")
    from matplotlib.figure import Figure

    cols = min(columns, n_panels)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path, title=None):
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def save_histograms(path, panels, labels=("a", "b"), title=None, bins=30):
    """Overlaid normalised histograms of two samples per panel.

    Parameters:
        path:   Output PNG path (written atomically).
        panels: dict panel title -> (sample a, sample b); NaNs are ignored.
        labels: Legend names of the two samples. [default: ("a", "b")]
        title:  Figure title. [default: None]
        bins:   Number of bins shared by both samples of a panel. [default: 30]
    """
    fig, axes = _grid(len(panels))
    for ax, (name, samples) in zip(axes, panels.items()):
        samples = [np.asarray(s, dtype=np.float64) for s in samples]
        samples = [s[np.isfinite(s)] for s in samples]
        both = np.concatenate(samples) if any(len(s) for s in samples) else np.zeros(1)
        lo, hi = np.percentile(both, [0.5, 99.5]) if len(both) > 1 else (both[0] - 1, both[0] + 1)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        for s, label in zip(samples, labels):
            ax.hist(np.clip(s, edges[0], edges[-1]), bins=edges, density=True, histtype="step",
                    label=f"{label} ({len(s)})")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    _save(fig, path, title)


def save_scatter(path, panels, title=None):
    """Scatter plots, one per panel.

    Parameters:
        path:   Output PNG path (written atomically).
        panels: dict panel title -> dict with ``x``, ``y``, optional ``c`` (colour values),
                ``xlabel``, ``ylabel``, ``clabel``, ``diagonal`` (draw y = x).
        title:  Figure title. [default: None]
    """
    fig, axes = _grid(len(panels), panel_size=(3.6, 3.2), columns=3)
    for ax, (name, p) in zip(axes, panels.items()):
        x, y = np.asarray(p["x"], float), np.asarray(p["y"], float)
        c = p.get("c")
        if c is None:
            ax.scatter(x, y, s=4, alpha=0.6)
        else:
            c = np.asarray(c, float)
            known = np.isfinite(c)
            ax.scatter(x[~known], y[~known], s=4, color="0.8", label="no data")
            sc = ax.scatter(x[known], y[known], s=6, c=c[known], cmap="viridis")
            fig.colorbar(sc, ax=ax, label=p.get("clabel", ""))
        if p.get("diagonal"):
            finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
            if len(finite):
                lo, hi = finite.min(), finite.max()
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(p.get("xlabel", ""), fontsize=8)
        ax.set_ylabel(p.get("ylabel", ""), fontsize=8)
        ax.set_title(name, fontsize=9)
    _save(fig, path, title)


def save_lines(path, categories, panels, title=None):
    """Line plots of a few named series over the same categories, one panel per quantity.

    Parameters:
        path:       Output PNG path (written atomically).
        categories: The x-axis labels (e.g. S/N bins).
        panels:     dict panel title -> dict with ``series`` (dict label -> values, one per
                    category; NaN leaves a gap), optional ``threshold`` (a dashed goal line) and
                    ``log`` (log y axis).
        title:      Figure title. [default: None]
    """
    fig, axes = _grid(len(panels))
    x = np.arange(len(categories))
    for ax, (name, p) in zip(axes, panels.items()):
        for label, values in p["series"].items():
            ax.plot(x, np.asarray(values, float), "o-", label=label, ms=4)
        if p.get("threshold") is not None:
            ax.axhline(p["threshold"], color="k", ls="--", lw=0.8, label="goal")
        if p.get("log"):
            ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(categories, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    _save(fig, path, title)


def save_training_curves(path, vqvae_log, prior_log=None, title=None):
    """Save the training curves of a VQ-VAE run and, optionally, of its prior.

    Parameters:
        path:       Output PNG path (written atomically).
        vqvae_log:  The ``log.jsonl`` of a ``train-vqvae`` run (chi^2/pixel, perplexity).
        prior_log:  The ``log.jsonl`` of a ``train-prior`` run (train and held-out bits per code).
                    [default: None]
        title:      Figure title. [default: None]
    """
    import json

    def read(log):
        try:
            with open(log) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as err:
            raise VQVAEInputError(f"{log}: not a readable training log ({err})") from None
        if not rows:
            raise VQVAEInputError(f"{log}: the training log is empty")
        return rows

    panels = [("VQ-VAE chi^2 / pixel", read(vqvae_log), {"train": "chi2"}, True),
              ("VQ-VAE code perplexity", read(vqvae_log), {"train": "perplexity"}, False)]
    if prior_log is not None:
        panels.append(("prior NLL (bits / code)", read(prior_log),
                       {"train": "train_bits_per_code", "held out": "test_bits_per_code"}, True))
    fig, axes = _grid(len(panels), columns=3)
    for ax, (name, rows, series, log) in zip(axes, panels):
        for label, key in series.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot(*zip(*pts), label=label, lw=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path, title)

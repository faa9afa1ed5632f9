"""The codebook: how many codes the model uses, and a t-SNE map of the code vectors coloured by
the galaxies that use them.

Usage is the fraction of the K codes that occur at least once in a set of code maps; perplexity
is exp(H) of their frequencies (H the Shannon entropy, natural log): K when all are used
equally, 1 when one code is used everywhere. The map is an exact t-SNE (van der Maaten & Hinton
2008) of the K code vectors, each coloured by the mean property (half-light radius, magnitude)
of the galaxies whose code maps contain it, weighted by the number of occurrences.
"""

import numpy as np

from ..errors import VQVAEInputError
from .common import Section, fmt

TITLE = "5. Codebook"


def usage_and_perplexity(codes, num_codes):
    """(fraction of the ``num_codes`` codes used in ``codes``, perplexity of their frequencies)."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64).ravel(), minlength=num_codes)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return float((counts > 0).mean()), float(np.exp(-(nz * np.log(nz)).sum()))


def code_means(codes, values, num_codes):
    """For each code, the mean of the per-map ``values`` [n] over its occurrences in ``codes``
    [n, h, w] (NaN for unused codes)."""
    codes = np.asarray(codes, dtype=np.int64).reshape(len(codes), -1)
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    codes, values = codes[ok], values[ok]
    counts = np.bincount(codes.ravel(), minlength=num_codes).astype(np.float64)
    sums = np.bincount(codes.ravel(), weights=np.repeat(values, codes.shape[1]),
                       minlength=num_codes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _conditional_probabilities(d2, perplexity, tol=1e-5, steps=100):
    """Row-wise p_{j|i} = exp(-beta_i d2_ij) / sum, beta_i found by bisection so that each row's
    entropy is log(perplexity)."""
    n = len(d2)
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        d = np.delete(d2[i], i)
        d = d - d.min()
        beta, lo, hi = 1.0, 0.0, np.inf
        for _ in range(steps):
            w = np.exp(-d * beta)
            s = w.sum()
            h = np.log(s) + beta * (d * w).sum() / s
            if abs(h - target) < tol:
                break
            if h > target:
                lo = beta
                beta = beta * 2 if hi == np.inf else 0.5 * (beta + hi)
            else:
                hi = beta
                beta = 0.5 * (beta + lo)
        p[i, np.arange(n) != i] = w / s
    return p


def tsne(x, dims=2, perplexity=30.0, iterations=1000, seed=0):
    """Exact t-SNE embedding (van der Maaten & Hinton 2008) of points ``x`` [n, D] -> [n, dims].

    Gaussian affinities calibrated to ``perplexity`` (capped at (n - 1) / 3), symmetrised;
    Student-t affinities in the embedding; gradient descent with early exaggeration 12 for the
    first 250 iterations, momentum 0.5 then 0.8, per-parameter gains, learning rate
    max(n / 48, 50); initialised by PCA scaled to standard deviation 1e-4. Deterministic for a
    given ``seed`` (used only to break ties of the PCA initialisation).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 4:
        raise VQVAEInputError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = min(float(perplexity), (n - 1) / 3.0)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0)
    p = _conditional_probabilities(d2, perplexity)
    p = np.maximum((p + p.T) / (2 * n), 1e-12)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    y = centred @ vt[:dims].T
    if y.shape[1] < dims:  # fewer features than dims
        y = np.hstack([y, np.zeros((n, dims - y.shape[1]))])
    y += 1e-8 * np.random.default_rng(seed).standard_normal(y.shape)
    y *= 1e-4 / max(y[:, 0].std(), 1e-300)
    lr = max(n / 48.0, 50.0)
    velocity = np.zeros_like(y)
    gains = np.ones_like(y)
    for it in range(iterations):
        exaggeration = 12.0 if it < 250 else 1.0
        momentum = 0.5 if it < 250 else 0.8
        sy = (y * y).sum(1)
        num = 1.0 / (1.0 + np.maximum(sy[:, None] + sy[None] - 2 * y @ y.T, 0))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        w = (exaggeration * p - q) * num
        grad = 4.0 * (np.diag(w.sum(1)) - w) @ y
        same = np.sign(grad) == np.sign(velocity)
        gains = np.maximum(np.where(same, gains * 0.8, gains + 0.2), 0.01)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
        y -= y.mean(0)
    return y


def run(emulator, out_dir, data_codes=None, data_properties=None, sample_codes=None,
        sample_properties=None, seed=0):
    """The codebook section: usage and perplexity of the code maps given (encoded held-out
    stamps and/or prior samples) and the t-SNE map coloured by the properties (dict name ->
    per-map values) of the first set given."""
    import os

    from ..plots import save_scatter

    k = int(emulator.metadata["num_codes"])
    codebook = emulator.vqvae.quantizer.codebook.detach().cpu().double().numpy()
    sec = Section(TITLE)
    sec.metrics["codebook.num_codes"] = k
    sec.lines += [f"K = {k} codes of dimension {codebook.shape[1]}.", "",
                  "| code maps | maps | usage | perplexity |", "| --- | --- | --- | --- |"]
    sets = [(name, c, p) for name, c, p in (("data", data_codes, data_properties),
                                            ("samples", sample_codes, sample_properties))
            if c is not None]
    panels = {}
    for name, codes, _ in sets:
        used, perplexity = usage_and_perplexity(codes, k)
        sec.metrics.update({f"codebook.{name}.usage": used,
                            f"codebook.{name}.perplexity": perplexity})
        label = "encoded held-out stamps" if name == "data" else "prior samples"
        sec.lines.append(f"| {label} | {len(codes)} | {fmt(used, 3)} | {fmt(perplexity, 4)} |")
        freq = np.sort(np.bincount(codes.ravel(), minlength=k))[::-1] / codes.size
        freq = freq[freq > 0]
        panels[f"code frequency ({label})"] = {
            "x": np.arange(len(freq)), "y": np.log10(freq),
            "xlabel": "code rank (used codes)", "ylabel": "log10 frequency"}
    sec.lines.append("")
    if sets and k >= 4:
        name, codes, properties = sets[0]
        y = tsne(codebook, seed=seed)
        for prop, values in (properties or {}).items():
            panels[f"t-SNE of the codebook: mean {prop}"] = {
                "x": y[:, 0], "y": y[:, 1], "c": code_means(codes, values, k), "clabel": prop}
        sec.lines += [f"t-SNE of the {k} code vectors, coloured by the mean property of the "
                      f"{'held-out stamps' if name == 'data' else 'samples'} using each code "
                      "(grey: unused).", ""]
    if panels:
        save_scatter(os.path.join(out_dir, "codebook.png"), panels, title="Codebook")
        sec.figures.append("codebook.png")
    return sec

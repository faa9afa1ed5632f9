"""The science validation report of a model (``galsim-vqvae evaluate``), one module per check:

- `fidelity`: deconvolution fidelity on held-out synthetic stamps, by S/N bin, against a plain
  autoencoder and Richardson-Lucy deconvolution;
- `realism`: prior samples against held-out truth (morphology statistics, KS tests);
- `conditioning`: measured against requested magnitude and half-light radius;
- `shear`: a ring test of `VQVAEGalaxy` objects through a ground PSF (m, c);
- `codebook`: code usage, perplexity and a t-SNE map of the code vectors;
- `real`: reduced chi^2 of the reconstructions of real galaxies;
- `report`: runs them and writes ``report.md``, ``metrics.json`` and the figures.

Definitions and sources: ``docs/evaluate.md``.
"""

from .report import evaluate  # noqa: F401

__all__ = ["evaluate"]

"""Galaxy data: the dataset file format, synthetic galaxies with truth, FITS stamps, GalSim
RealGalaxyCatalogs (COSMOS), and noise estimation.

- `galsim_vqvae.data.dataset`: `DatasetWriter`, `read_header`, `load_arrays`, `split_indices`,
  `GalaxyDataset`.
- `galsim_vqvae.data.synthetic.make_synthetic_dataset`
- `galsim_vqvae.data.fits.make_fits_dataset`
- `galsim_vqvae.data.cosmos.make_cosmos_dataset`
- `galsim_vqvae.data.noise.estimate_sigma`

Submodules import GalSim lazily; importing this package is cheap.
"""

"""The galaxy dataset file: HDF5, written by streaming, read whole or per stamp.

Layout (format ``galsim_vqvae.dataset``, version 2; a file without a noise model is written as
version 1, which older readers read too):

- file attributes: ``format``, ``format_version``, ``pixel_scale`` (arcsec/pixel), ``stamp_size``,
  ``band``, ``zeropoint`` (mag = -2.5 log10(flux) + zeropoint), ``source``
  ("synthetic" | "fits" | "cosmos"), ``description``, ``seed`` (-1 if none), ``flux_convention``.
- ``observed`` [N,S,S] f32; ``truth`` [N,S,S] f32 (synthetic only); ``psf_bank`` [P,S,S] f32 (each
  PSF sums to 1, centred at pixel (S//2, S//2), pixel response included); ``psf_index`` [N] int32;
  ``sigma`` [N] f32 (Gaussian noise sigma per stamp, pixel units); group ``params`` of [N] f32.
- Version 2 adds the noise model, each part optional: ``noise_bank`` [Q,S,S] f32 (power spectra
  of the stamps' noise on numpy's ``fft2`` grid, each of mean 1, so that the pixel variance is
  sigma^2; `galsim_vqvae.data.noise`) with ``noise_index`` [N] int32, and ``weight`` [N,S,S] f32
  (relative inverse variance of each pixel, >= 0; 0 where there is no data: padding, masked
  neighbours). Without them (every version-1 file) the noise is white and every weight 1.

Stamp ``i`` is held out (the "test" split) iff ``i % 10 == 9``.
"""

import contextlib
import json
import os
import sys

import numpy as np

from ..errors import VQVAEFormatError, VQVAEInputError
from ..fileio import atomic_path

FORMAT = "galsim_vqvae.dataset"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: no noise model (white noise of sigma, every weight 1)
NOISE_KEYS = ("noise_bank", "noise_index", "weight")  # version 2, optional
FLUX_CONVENTION = "pixel value = flux in the pixel (counts/s); stamp sum = total flux"
SOURCES = ("synthetic", "fits", "cosmos")
STAMP_KEYS = ("observed", "truth", "psf_index", "sigma")  # per-stamp top-level datasets
HEADER_KEYS = ("format", "format_version", "pixel_scale", "stamp_size", "band", "zeropoint",
               "source", "description", "seed", "flux_convention")
_CHUNK_ROWS = 16  # HDF5 chunk: 16 stamps (~450 kB at 84x84), cheap random access per item
_PSF_SUM_TOL = 1e-3


def split_indices(n, split):
    """Indices of the stamps of one split of an ``n``-stamp dataset.

    Parameters:
        n:      Number of stamps in the dataset.
        split:  ``"train"`` (i % 10 != 9), ``"test"`` (i % 10 == 9) or None (all stamps).

    Returns:
        numpy int64 array of stamp indices, increasing.
    """
    idx = np.arange(int(n), dtype=np.int64)
    if split is None or split == "all":
        return idx
    if split == "train":
        return idx[idx % 10 != 9]
    if split == "test":
        return idx[idx % 10 == 9]
    raise VQVAEInputError(f"split must be 'train', 'test' or None, got {split!r}")


def _h5py():
    from ..extras import require

    return require("h5py")


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


@contextlib.contextmanager
def _reading(path):
    """Turn any failure while reading the file (HDF5 errors of a damaged or truncated file,
    objects of the wrong kind) into a `VQVAEFormatError` naming it."""
    try:
        yield
    except VQVAEInputError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py raises many types for damaged files
        raise VQVAEFormatError(f"{path}: the dataset file is damaged or truncated (reading it "
                               f"failed: {type(err).__name__}: {err})") from None


def _open(path):
    """Open a dataset file for reading and check its format; raise VQVAEFormatError naming it."""
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VQVAEFormatError(f"dataset file not found: {path}")
    if os.path.isdir(path):
        raise VQVAEFormatError(f"dataset path is a directory, not a file: {path}")
    try:
        f = h5py.File(path, "r")
    except Exception as err:  # noqa: BLE001 - OSError mostly; anything means "not readable"
        raise VQVAEFormatError(f"{path}: not a readable HDF5 dataset file (truncated or not "
                               f"HDF5): {err}") from None
    try:
        with _reading(path):
            fmt = _attr(f.attrs.get("format"))
            if fmt != FORMAT:
                raise VQVAEFormatError(f"{path}: attribute format is {fmt!r}, expected "
                                       f"{FORMAT!r}")
            version = _attr(f.attrs.get("format_version"))
            if version not in READ_VERSIONS:
                reads = " and ".join(map(str, READ_VERSIONS))
                raise VQVAEFormatError(f"{path}: unknown format_version {version!r} (this version "
                                       f"of galsim_vqvae reads {reads})")
            _check_attributes(f, path)
            _check_layout(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check_attributes(f, path):
    """The header attributes have the types and ranges of the format."""
    def fail(key, what):
        raise VQVAEFormatError(f"{path}: attribute {key} is {_attr(f.attrs.get(key))!r}; "
                               f"expected {what}")

    for key in HEADER_KEYS:
        if key not in f.attrs:
            raise VQVAEFormatError(f"{path}: attribute {key} is missing")
    s = _attr(f.attrs["stamp_size"])
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        fail("stamp_size", "a positive integer")
    for key, positive in (("pixel_scale", True), ("zeropoint", False)):
        v = _attr(f.attrs[key])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) \
                or (positive and not v > 0):
            fail(key, "a positive number" if positive else "a finite number")
    for key in ("band", "source", "description", "flux_convention"):
        if not isinstance(_attr(f.attrs[key]), str):
            fail(key, "a string")


def _check_layout(f, path):
    h5py = _h5py()
    for key in ("observed", "psf_bank", "psf_index", "sigma"):
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise VQVAEFormatError(f"{path}: missing dataset {key!r}")
    s = _attr(f.attrs.get("stamp_size"))
    for key in ("observed", "psf_bank", "psf_index", "sigma", "truth") + NOISE_KEYS:
        if key in f and not isinstance(f[key], h5py.Dataset):
            raise VQVAEFormatError(f"{path}: {key} is not an array")
        integer = key in ("psf_index", "noise_index")
        if key in f and f[key].dtype.kind not in ("iu" if integer else "fiu"):
            raise VQVAEFormatError(f"{path}: {key} holds {f[key].dtype} values, not "
                                   f"{'integers' if integer else 'numbers'}")
    if _attr(f.attrs.get("format_version")) == 1 and any(k in f for k in NOISE_KEYS):
        raise VQVAEFormatError(f"{path}: format_version 1 file holds noise-model arrays "
                               f"{[k for k in NOISE_KEYS if k in f]} (version 2 arrays)")
    if ("noise_bank" in f) != ("noise_index" in f):
        raise VQVAEFormatError(f"{path}: noise_bank and noise_index come together; the file has "
                               f"only {'noise_bank' if 'noise_bank' in f else 'noise_index'}")
    if "params" in f:
        if not isinstance(f["params"], h5py.Group):
            raise VQVAEFormatError(f"{path}: params is not a group of arrays")
        for name, col in f["params"].items():
            if not isinstance(col, h5py.Dataset) or col.dtype.kind not in "fiu":
                raise VQVAEFormatError(f"{path}: params/{name} is not an array of numbers")
    obs = f["observed"]
    if obs.ndim != 3 or obs.shape[1:] != (s, s):
        raise VQVAEFormatError(f"{path}: observed has shape {obs.shape}, expected (N, {s}, {s}) "
                               f"for stamp_size {s}")
    n = obs.shape[0]
    bank = f["psf_bank"]
    if bank.ndim != 3 or bank.shape[1:] != (s, s) or (n and bank.shape[0] == 0):
        raise VQVAEFormatError(f"{path}: psf_bank has shape {bank.shape}, expected (P>0, {s}, {s})")
    if "noise_bank" in f:
        nb = f["noise_bank"]
        if nb.ndim != 3 or nb.shape[1:] != (s, s) or (n and nb.shape[0] == 0):
            raise VQVAEFormatError(f"{path}: noise_bank has shape {nb.shape}, expected "
                                   f"(Q>0, {s}, {s})")
    shapes = {"psf_index": (n,), "sigma": (n,)}
    for key, shape in (("truth", (n, s, s)), ("noise_index", (n,)), ("weight", (n, s, s))):
        if key in f:
            shapes[key] = shape
    if "params" in f:
        for name, col in f["params"].items():
            shapes[f"params/{name}"] = (n,)
    for key, shape in shapes.items():
        if f[key].shape != shape:
            raise VQVAEFormatError(f"{path}: {key} has shape {f[key].shape}, inconsistent with "
                                   f"{n} observed stamps (expected {shape})")


def _class_names(text, path):
    """The ``class_names`` attribute (a JSON list of strings) as a list."""
    try:
        names = json.loads(text)
    except (TypeError, ValueError):
        names = None
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        raise VQVAEFormatError(f"{path}: attribute class_names is not a JSON list of names: "
                               f"{text!r:.80}")
    return names


def read_header(path):
    """The header of a dataset file: its attributes plus ``n``, ``n_psf``, ``has_truth``,
    ``noise`` (the noise-model arrays it holds, a subset of ``NOISE_KEYS``), ``params`` (list of
    names) and ``path``.

    Parameters:
        path:   Dataset file (HDF5).

    Raises:
        VQVAEFormatError if the file is missing, not HDF5, truncated, of another format or version,
        or its datasets are missing or of inconsistent lengths.
    """
    with contextlib.closing(_open(path)) as f, _reading(path):
        header = {k: _attr(v) for k, v in f.attrs.items()}
        if "class_names" in header:
            header["class_names"] = _class_names(header["class_names"], path)
        header["n"] = int(f["observed"].shape[0])
        header["n_psf"] = int(f["psf_bank"].shape[0])
        header["has_truth"] = "truth" in f
        header["noise"] = [k for k in NOISE_KEYS if k in f]
        header["params"] = sorted(f["params"].keys()) if "params" in f else []
        header["path"] = os.path.abspath(os.fspath(path))
    return header


def _read_rows(dset, indices, block=2048):
    """Rows ``indices`` (any order, repeats allowed) of an HDF5 dataset, read efficiently."""
    n = dset.shape[0]
    uniq, inverse = np.unique(indices, return_inverse=True)
    if len(uniq) == 0:
        return np.zeros((0,) + dset.shape[1:], dtype=dset.dtype)
    if len(uniq) * 8 < n or len(uniq) < 64:
        rows = dset[uniq] if len(uniq) > 1 else dset[int(uniq[0]):int(uniq[0]) + 1]
    else:  # dense selection: read contiguous blocks and pick (h5py fancy indexing is slow)
        rows = np.empty((len(uniq),) + dset.shape[1:], dtype=dset.dtype)
        pos = 0
        for start in range(int(uniq[0]), int(uniq[-1]) + 1, block):
            stop = min(start + block, n)
            k = np.searchsorted(uniq, stop) - pos
            if k:
                data = dset[start:stop]
                rows[pos:pos + k] = data[uniq[pos:pos + k] - start]
                pos += k
    if len(uniq) == len(indices) and np.array_equal(uniq, indices):
        return rows  # already in order: no second copy of a possibly large array
    return rows[inverse]


def load_arrays(path, indices=None, keys=None):
    """Arrays of a dataset file, in memory.

    Parameters:
        path:       Dataset file (HDF5).
        indices:    Stamp indices to load (any order; e.g. ``split_indices(n, "train")``), or None
                    for all stamps. ``psf_bank`` is always returned whole. [default: None]
        keys:       Names to load: any of ``observed``, ``truth``, ``psf_bank``, ``psf_index``,
                    ``sigma``, ``noise_bank``, ``noise_index``, ``weight``, ``params`` (all
                    parameters) or ``params/NAME``. None loads all. The noise-model arrays
                    are left out of the result when the file has none (white noise, every
                    weight 1). [default: None]

    Returns:
        dict of numpy arrays; parameters appear as ``"params/NAME"`` keys. ``psf_bank`` and
        ``noise_bank`` are whole.
    """
    with contextlib.closing(_open(path)) as f, _reading(path):
        n = f["observed"].shape[0]
        param_names = sorted(f["params"].keys()) if "params" in f else []
        if keys is None:
            keys = [k for k in ("observed", "truth", "psf_bank", "psf_index", "sigma")
                    + NOISE_KEYS if k in f]
            keys += ["params"]
        if isinstance(keys, str):
            keys = [keys]
        wanted = []
        for key in keys:
            if key == "params":
                wanted += [f"params/{p}" for p in param_names]
            elif key in f or key.startswith("params/") and key[7:] in param_names:
                wanted.append(key)
            elif key in NOISE_KEYS:
                continue  # no noise model: white noise, every weight 1
            else:
                raise VQVAEInputError(f"{path}: no array {key!r} in the dataset (has "
                                      f"{sorted(k for k in f.keys() if k != 'params')} and "
                                      f"params {param_names})")
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if indices.size and (indices.min() < 0 or indices.max() >= n):
                bad = indices[(indices < 0) | (indices >= n)][0]
                raise VQVAEInputError(f"{path}: stamp index {bad} out of range [0, {n})")
        out = {}
        for key in wanted:
            dset = f[key]
            if key in ("psf_bank", "noise_bank") or indices is None:
                out[key] = dset[()]
            else:
                out[key] = _read_rows(dset, indices)
    return out


def median_sigma(path, split="train"):
    """The median noise sigma of the stamps of one split of a dataset file."""
    rows = split_indices(read_header(path)["n"], split)
    return float(np.median(load_arrays(path, indices=rows, keys=("sigma",))["sigma"]))


def mean_psf(path):
    """The mean PSF image [S, S] (float64) of a dataset's stamps: the PSF bank weighted by the
    number of stamps that use each entry."""
    arrays = load_arrays(path, keys=("psf_bank", "psf_index"))
    counts = np.bincount(arrays["psf_index"], minlength=len(arrays["psf_bank"]))
    return np.tensordot(counts / counts.sum(), arrays["psf_bank"].astype(np.float64), axes=1)


class DatasetWriter:
    """Write a dataset file by streaming chunks of stamps; the file appears only on success.

    Use as a context manager::

        with DatasetWriter(path, stamp_size=84, pixel_scale=0.06, band="F160W",
                           zeropoint=25.94, source="synthetic", seed=1) as w:
            w.add_psfs(bank)                                  # -> their indices
            w.add_noise_power(power)                          # optional (correlated noise)
            w.append(observed=obs, sigma=sig, psf_index=idx, truth=tru, params={"mag": m},
                     noise_index=nidx, weight=wgt)            # the last two optional

    Parameters:
        path:           Output file. Written to a temporary file beside it and renamed on success;
                        an exception inside the block leaves nothing behind.
        stamp_size:     Stamp side S in pixels.
        pixel_scale:    Pixel scale in arcsec/pixel.
        band:           Name of the band, e.g. "F160W".
        zeropoint:      AB zeropoint: mag = -2.5 log10(flux) + zeropoint.
        source:         "synthetic", "fits" or "cosmos".
        description:    Free text. [default: ""]
        seed:           Generating seed, -1 if none. [default: -1]
        compression:    None, "lzf" or "gzip" (HDF5 filters on every stamp array). [default: None]
        class_names:    Names of the classes of an integer ``params/morph_class`` label (value k
                        means ``class_names[k]``), stored as the attribute ``class_names``.
                        [default: None]
        population:     Name of a synthetic galaxy population, stored as the attribute
                        ``population``. [default: None, no attribute]
    """

    def __init__(self, path, stamp_size, pixel_scale, band, zeropoint, source, description="",
                 seed=-1, compression=None, class_names=None, population=None):
        if source not in SOURCES:
            raise VQVAEInputError(f"source must be one of {SOURCES}, got {source!r}")
        if compression not in (None, "lzf", "gzip"):
            raise VQVAEInputError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        if int(stamp_size) <= 0 or not float(pixel_scale) > 0:
            raise VQVAEInputError(f"bad stamp_size {stamp_size} or pixel_scale {pixel_scale}")
        self.path = os.fspath(path)
        self.stamp_size = int(stamp_size)
        self.attrs = dict(format=FORMAT, format_version=FORMAT_VERSION,
                          pixel_scale=float(pixel_scale), stamp_size=self.stamp_size,
                          band=str(band), zeropoint=float(zeropoint), source=str(source),
                          description=str(description), seed=int(-1 if seed is None else seed),
                          flux_convention=FLUX_CONVENTION)
        if class_names is not None:
            self.attrs["class_names"] = json.dumps([str(c) for c in class_names])
        if population is not None:
            self.attrs["population"] = str(population)
        self.compression = compression
        self.n = 0
        self.n_psf = 0
        self.n_noise = 0
        self._file = None
        self._stack = None

    def __enter__(self):
        h5py = _h5py()
        self._stack = contextlib.ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_path(self.path))
            # HDF5 1.10+ structures checksum all metadata (and fletcher32 each chunk): a damaged
            # file is refused by libhdf5 instead of being parsed into a crash or a hang.
            self._file = self._stack.enter_context(h5py.File(tmp, "w", libver=("v110", "latest")))
        except BaseException:
            self._stack.close()
            raise
        self._file.attrs.update(self.attrs)
        return self

    def __exit__(self, exc_type, exc, tb):
        stack, self._stack = self._stack, None
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            self._file = None
            if not stack.__exit__(*sys.exc_info()):
                raise
            return False
        self._file = None
        return stack.__exit__(exc_type, exc, tb)

    def _dataset(self, name, shape_tail, dtype):
        f = self._file
        if name not in f:
            rows = _CHUNK_ROWS if shape_tail else 4096
            f.create_dataset(name, shape=(0,) + shape_tail, maxshape=(None,) + shape_tail,
                             dtype=dtype, chunks=(rows,) + shape_tail,
                             compression=self.compression, fletcher32=True)
        return f[name]

    @staticmethod
    def _grow(dset, data):
        start = dset.shape[0]
        dset.resize(start + len(data), axis=0)
        dset[start:] = data

    def add_psfs(self, psfs):
        """Append PSF images [P,S,S] (or one [S,S]) to ``psf_bank``; return their indices [P]."""
        if self._file is None:
            raise RuntimeError("DatasetWriter is not open (use it in a with block)")
        s = self.stamp_size
        psfs = np.asarray(psfs, dtype=np.float32)
        if psfs.ndim == 2:
            psfs = psfs[None]
        if psfs.ndim != 3 or psfs.shape[1:] != (s, s):
            raise VQVAEInputError(f"{self.path}: PSF images have shape {psfs.shape}, expected "
                                  f"(P, {s}, {s})")
        if not np.all(np.isfinite(psfs)):
            raise VQVAEInputError(f"{self.path}: PSF images contain NaN or inf")
        sums = psfs.astype(np.float64).sum(axis=(1, 2))
        bad = np.flatnonzero(np.abs(sums - 1) > _PSF_SUM_TOL)
        if bad.size:
            raise VQVAEInputError(f"{self.path}: PSF {self.n_psf + bad[0]} sums to {sums[bad[0]]:.6g}"
                                  f", expected 1 (normalise PSFs before writing)")
        self._grow(self._dataset("psf_bank", (s, s), "f4"), psfs)
        first = self.n_psf
        self.n_psf += len(psfs)
        return np.arange(first, self.n_psf, dtype=np.int32)

    def add_noise_power(self, powers):
        """Append noise power spectra [Q,S,S] (or one [S,S]) to ``noise_bank``; return their
        indices [Q]. Each is the expected periodogram of the noise of an S x S stamp on numpy's
        ``fft2`` grid, normalised to mean 1 (`galsim_vqvae.data.noise.power_from_correlation`)."""
        if self._file is None:
            raise RuntimeError("DatasetWriter is not open (use it in a with block)")
        s = self.stamp_size
        powers = np.asarray(powers, dtype=np.float64)
        if powers.ndim == 2:
            powers = powers[None]
        if powers.ndim != 3 or powers.shape[1:] != (s, s):
            raise VQVAEInputError(f"{self.path}: noise power spectra have shape {powers.shape}, "
                                  f"expected (Q, {s}, {s})")
        if not (np.isfinite(powers).all() and (powers > 0).all()):
            raise VQVAEInputError(f"{self.path}: noise power spectrum {self.n_noise} has "
                                  f"non-positive or non-finite values")
        means = powers.mean(axis=(1, 2))
        bad = np.flatnonzero(np.abs(means - 1) > _PSF_SUM_TOL)
        if bad.size:
            raise VQVAEInputError(f"{self.path}: noise power spectrum {self.n_noise + bad[0]} has "
                                  f"mean {means[bad[0]]:.6g}, expected 1 (sigma holds the scale)")
        self._grow(self._dataset("noise_bank", (s, s), "f4"), powers.astype(np.float32))
        first = self.n_noise
        self.n_noise += len(powers)
        return np.arange(first, self.n_noise, dtype=np.int32)

    def append(self, observed, sigma, psf_index, truth=None, params=None, noise_index=None,
               weight=None):
        """Append a chunk of B stamps.

        Parameters:
            observed:   [B,S,S] observed stamps.
            sigma:      [B] Gaussian noise sigma per stamp (pixel units).
            psf_index:  [B] indices into the PSF bank (see `add_psfs`).
            truth:      [B,S,S] noiseless pre-PSF stamps, or None. Either every chunk has truth
                        or none does. [default: None]
            params:     dict name -> [B] per-stamp parameters; every chunk the same names.
                        [default: None]
            noise_index: [B] indices into the noise bank (see `add_noise_power`), or None for
                        white noise. Either every chunk has it or none does. [default: None]
            weight:     [B,S,S] relative inverse variance of each pixel (>= 0, 0 where there is
                        no data, some pixel of each stamp > 0), or None for every weight 1.
                        Either every chunk has it or none does. [default: None]
        """
        if self._file is None:
            raise RuntimeError("DatasetWriter is not open (use it in a with block)")
        s = self.stamp_size
        observed = np.asarray(observed, dtype=np.float32)
        b = len(observed)
        if observed.shape != (b, s, s):
            raise VQVAEInputError(f"{self.path}: observed chunk has shape {observed.shape}, "
                                  f"expected (B, {s}, {s})")
        sigma = np.asarray(sigma, dtype=np.float32).reshape(-1)
        psf_index = np.asarray(psf_index).reshape(-1)
        if sigma.shape != (b,) or psf_index.shape != (b,):
            raise VQVAEInputError(f"{self.path}: sigma {sigma.shape} / psf_index {psf_index.shape} "
                                  f"do not match {b} stamps")
        if b and (psf_index.min() < 0 or psf_index.max() >= max(self.n_psf, 0)):
            raise VQVAEInputError(f"{self.path}: psf_index value outside [0, {self.n_psf}); add the "
                                  f"PSFs first")
        if not (np.all(np.isfinite(observed)) and np.all(np.isfinite(sigma))):
            raise VQVAEInputError(f"{self.path}: observed or sigma contain NaN or inf (stamps "
                                  f"{self.n}..{self.n + b - 1})")
        for key, value in (("truth", truth), ("noise_index", noise_index), ("weight", weight)):
            if self.n > 0 and (value is None) == (key in self._file):
                raise VQVAEInputError(f"{self.path}: {key} given for some chunks but not others")
        if noise_index is not None:
            noise_index = np.asarray(noise_index).reshape(-1)
            if noise_index.shape != (b,):
                raise VQVAEInputError(f"{self.path}: noise_index {noise_index.shape} does not "
                                      f"match {b} stamps")
            if b and (noise_index.min() < 0 or noise_index.max() >= self.n_noise):
                raise VQVAEInputError(f"{self.path}: noise_index value outside [0, "
                                      f"{self.n_noise}); add the noise power spectra first")
        if weight is not None:
            weight = np.asarray(weight, dtype=np.float32)
            if weight.shape != (b, s, s):
                raise VQVAEInputError(f"{self.path}: weight chunk has shape {weight.shape}, "
                                      f"expected ({b}, {s}, {s})")
            if not np.isfinite(weight).all() or (weight < 0).any():
                raise VQVAEInputError(f"{self.path}: weight of stamps {self.n}..{self.n + b - 1} "
                                      f"has negative or non-finite values")
            empty = np.flatnonzero(~(weight > 0).any(axis=(1, 2)))
            if empty.size:
                raise VQVAEInputError(f"{self.path}: stamp {self.n + empty[0]} has no pixel of "
                                      f"positive weight (its mask leaves it empty)")
        params = dict(params or {})
        if self.n > 0:
            have = sorted(self._file["params"].keys()) if "params" in self._file else []
            if sorted(params) != have:
                raise VQVAEInputError(f"{self.path}: params {sorted(params)} differ from earlier "
                                      f"chunks' {have}")
        self._grow(self._dataset("observed", (s, s), "f4"), observed)
        self._grow(self._dataset("sigma", (), "f4"), sigma)
        self._grow(self._dataset("psf_index", (), "i4"), psf_index.astype(np.int32))
        if truth is not None:
            truth = np.asarray(truth, dtype=np.float32)
            if truth.shape != (b, s, s):
                raise VQVAEInputError(f"{self.path}: truth chunk has shape {truth.shape}, expected "
                                      f"({b}, {s}, {s})")
            self._grow(self._dataset("truth", (s, s), "f4"), truth)
        for name, value in params.items():
            value = np.asarray(value, dtype=np.float32).reshape(-1)
            if value.shape != (b,):
                raise VQVAEInputError(f"{self.path}: params/{name} has {value.size} values for "
                                      f"{b} stamps")
            self._grow(self._dataset(f"params/{name}", (), "f4"), value)
        if noise_index is not None:
            self._grow(self._dataset("noise_index", (), "i4"), noise_index.astype(np.int32))
        if weight is not None:
            self._grow(self._dataset("weight", (s, s), "f4"), weight)
        self.n += b

    def _finish(self):
        s = self.stamp_size
        for key, shape, dtype in (("observed", (s, s), "f4"), ("sigma", (), "f4"),
                                  ("psf_index", (), "i4"), ("psf_bank", (s, s), "f4")):
            self._dataset(key, shape, dtype)
        if self.n > 0 and self.n_psf == 0:
            raise VQVAEInputError(f"{self.path}: {self.n} stamps but no PSF in the bank")
        if self.n > 0 and ("noise_bank" in self._file) != ("noise_index" in self._file):
            raise VQVAEInputError(f"{self.path}: noise power spectra were added but no stamp has "
                                  f"a noise_index")
        # version 2 only for what version 1 cannot hold: older readers still read the rest
        noise = any(k in self._file for k in NOISE_KEYS)
        self._file.attrs["format_version"] = FORMAT_VERSION if noise else 1


class GalaxyDataset:
    """A torch ``Dataset`` over a dataset file, for a DataLoader (with or without workers).

    The HDF5 file is opened lazily, once per process, so DataLoader worker processes each get
    their own handle. An item is a dict of tensors: ``observed`` [1,S,S], ``psf`` [1,S,S],
    ``sigma`` [], ``noise_power`` [S,S] (the noise power spectrum shape, all ones for white
    noise), ``weight`` [1,S,S] (all ones without a weight map), ``truth`` [1,S,S] (if the file
    has it), ``params`` {name: []} and ``index`` (the stamp's index in the file).

    Parameters:
        path:   Dataset file (HDF5).
        split:  "train", "test" or None (all stamps). [default: None]
    """

    def __init__(self, path, split=None):
        self.path = os.fspath(path)
        self.header = read_header(self.path)
        self.split = split
        self.indices = split_indices(self.header["n"], split)
        self._file = None
        self._pid = None
        self._bank = None
        self._noise_bank = None

    def __len__(self):
        return len(self.indices)

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = _open(self.path)
            self._pid = os.getpid()
            with _reading(self.path):
                self._bank = self._file["psf_bank"][()]
                s = self._bank.shape[-1]
                self._noise_bank = (self._file["noise_bank"][()] if "noise_bank" in self._file
                                    else np.ones((1, s, s), np.float32))
        return self._file

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"], state["_bank"], state["_noise_bank"] = (None,) * 4
        return state

    def __getitem__(self, k):
        import torch

        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} stamps")
        i = int(self.indices[k])
        f = self._handle()
        with _reading(self.path):
            p = int(f["psf_index"][i])
            if not 0 <= p < len(self._bank):
                raise VQVAEFormatError(f"{self.path}: stamp {i} has psf_index {p}, outside the "
                                       f"PSF bank [0, {len(self._bank)})")
            item = {"observed": torch.from_numpy(f["observed"][i][None].astype(np.float32)),
                    "psf": torch.from_numpy(self._bank[p][None].astype(np.float32)),
                    "sigma": torch.tensor(float(f["sigma"][i]), dtype=torch.float32),
                    "index": torch.tensor(i, dtype=torch.int64)}
            q = int(f["noise_index"][i]) if "noise_index" in f else 0
            if not 0 <= q < len(self._noise_bank):
                raise VQVAEFormatError(f"{self.path}: stamp {i} has noise_index {q}, outside the "
                                       f"noise bank [0, {len(self._noise_bank)})")
            item["noise_power"] = torch.from_numpy(self._noise_bank[q].astype(np.float32))
            item["weight"] = (torch.from_numpy(f["weight"][i][None].astype(np.float32))
                              if "weight" in f else torch.ones_like(item["observed"]))
            if "truth" in f:
                item["truth"] = torch.from_numpy(f["truth"][i][None].astype(np.float32))
            item["params"] = {name: torch.tensor(float(col[i]), dtype=torch.float32)
                              for name, col in (f["params"].items() if "params" in f else ())}
        return item

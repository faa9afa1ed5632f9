"""The Emulator: a trained VQ-VAE, its Gated PixelCNN prior and their metadata, as one bundle.

A bundle is a single ``.safetensors`` file: the weights of both networks and the training PSF
image as tensors, and the metadata as JSON in the file's header. Loading never unpickles anything;
it checks the format version, the metadata and every tensor's shape, and names what does not fit.
"""

import json
import os
import warnings

import numpy as np
import torch

from .devices import resolve_device
from .errors import VQVAEFormatError, VQVAEInputError
from .fileio import atomic_path
from .nn.pixelcnn import GatedPixelCNN
from .nn.fast_sampling import sample_fast
from .nn.sampling import per_sample_seeds, sample_naive
from .nn.vqvae import VQVAE

FORMAT_VERSION = 1
_HEADER_KEY = "galsim_vqvae"
_DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "models", "default", "model.safetensors")
_REQUIRED_METADATA = ("format_version", "pixel_scale", "stamp_size", "latent_size", "num_codes",
                      "band", "zeropoint", "flux_convention", "psf_fwhm", "conditions",
                      "vqvae_config", "prior_config", "training_data")
_SIZE_FIELDS = ("stamp_size", "hidden", "res_blocks", "res_hidden", "embed_dim", "num_codes",
                "channels", "layers", "kernel_size", "cond_dim", "num_classes")  # network sizes
_SAMPLERS = {"fast": sample_fast, "naive": sample_naive}
OUT_OF_RANGE_POLICIES = ("error", "clip")


def _positive_count(n, what="n"):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise VQVAEInputError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


class Emulator:
    """A learned galaxy model: VQ-VAE decoder, Gated PixelCNN prior over its code maps, metadata.

    Parameters:
        vqvae:      The trained `galsim_vqvae.nn.vqvae.VQVAE`.
        prior:      The trained `galsim_vqvae.nn.pixelcnn.GatedPixelCNN` over its code maps.
        metadata:   A dict with at least the keys of ``_REQUIRED_METADATA`` (see `save`).
        psf_image:  The training PSF image (numpy array, sums to 1) at the model's pixel scale.
    """

    def __init__(self, vqvae, prior, metadata, psf_image):
        self.vqvae = vqvae.eval()
        self.prior = prior.eval()
        self.metadata = dict(metadata)
        self.psf_image = np.asarray(psf_image, dtype=np.float32)
        missing = [k for k in _REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise VQVAEFormatError(f"model <in memory>: metadata lacks {missing}")
        _check_metadata(self.metadata, "<in memory>")
        _check_consistency(self.vqvae, self.prior, self.metadata, self.psf_image, "<in memory>")

    # ----------------------------------------------------------------------------------------
    # Construction, loading and saving
    @property
    def device(self):
        return next(self.vqvae.parameters()).device

    def to(self, device):
        """Move both networks to ``device``; returns self."""
        device = resolve_device(device)
        self.vqvae.to(device)
        self.prior.to(device)
        return self

    @property
    def condition_names(self):
        """The names of the conditioning labels, in the order the prior expects them."""
        return list(self.metadata["conditions"].get("names", []))

    @classmethod
    def load(cls, file_name="default", device="cpu"):
        """Load a bundle: ``"default"`` for the model shipped with the package, or a path.

        Parameters:
            file_name:  ``"default"``, a ``.safetensors`` bundle, or a directory holding
                        ``model.safetensors``. [default: "default"]
            device:     The torch device to put the networks on. [default: "cpu"]
        """
        path = _DEFAULT_PATH if file_name in (None, "default") else os.fspath(file_name)
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            if file_name in (None, "default"):
                raise VQVAEFormatError(f"the shipped default model is missing from the "
                                       f"installation ({path}); reinstall galsim_vqvae")
            raise VQVAEFormatError(f"model file not found: {path}")
        device = resolve_device(device)
        tensors, metadata = _read_bundle(path)
        _check_metadata(metadata, path)
        vqvae = _build(VQVAE, metadata["vqvae_config"], "vqvae_config", path, tensors, "vqvae.")
        prior = _build(GatedPixelCNN, metadata["prior_config"], "prior_config", path, tensors,
                       "prior.")
        if "psf_image" not in tensors:
            raise VQVAEFormatError(f"model file {path} has no 'psf_image' tensor")
        emulator = cls.__new__(cls)
        emulator.vqvae = vqvae.eval()
        emulator.prior = prior.eval()
        emulator.metadata = metadata
        emulator.psf_image = tensors["psf_image"].float().numpy()
        _check_consistency(vqvae, prior, metadata, emulator.psf_image, path)
        emulator.path = path
        return emulator.to(device)

    def save(self, path):
        """Write the bundle to ``path`` (a ``.safetensors`` file), atomically."""
        from safetensors.torch import save

        tensors = {"vqvae." + k: v.detach().cpu().contiguous()
                   for k, v in self.vqvae.state_dict().items()}
        tensors.update({"prior." + k: v.detach().cpu().contiguous()
                        for k, v in self.prior.state_dict().items()})
        tensors["psf_image"] = torch.from_numpy(np.ascontiguousarray(self.psf_image))
        metadata = dict(self.metadata, format_version=FORMAT_VERSION)
        payload = save(tensors, metadata={_HEADER_KEY: json.dumps(metadata)})
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a full disk: an OSError naming it
            f.write(payload)

    @classmethod
    def from_checkpoints(cls, vqvae_checkpoint, prior_checkpoint, psf_image=None):
        """Assemble a bundle from the checkpoints written by ``train-vqvae`` and ``train-prior``.

        Parameters:
            vqvae_checkpoint:   Path of the VQ-VAE's ``checkpoint.pt``.
            prior_checkpoint:   Path of the prior's ``checkpoint.pt``.
            psf_image:          The training PSF image; by default the mean of the PSFs of the
                                training stamps, read from the dataset the VQ-VAE was trained on.
                                [default: None]
        """
        from .train.checkpoint import load_checkpoint

        vq_state = load_checkpoint(vqvae_checkpoint)
        prior_state = load_checkpoint(prior_checkpoint)
        vqvae = VQVAE.from_config(vq_state["config"])
        vqvae.load_state_dict(vq_state["model"])
        prior = GatedPixelCNN(**prior_state["config"])
        prior.load_state_dict(prior_state["model"])
        data = dict(vq_state["data"])
        if psf_image is None:
            psf_image = _mean_training_psf(data["path"])
        psf_image = np.asarray(psf_image, dtype=np.float64)
        psf_image = (psf_image / psf_image.sum()).astype(np.float32)
        latent = vqvae.config["stamp_size"] // 4
        metadata = {
            "format_version": FORMAT_VERSION,
            "pixel_scale": float(data["pixel_scale"]),
            "stamp_size": int(data["stamp_size"]),
            "latent_size": int(latent),
            "num_codes": int(vqvae.config["num_codes"]),
            "embed_dim": int(vqvae.config["embed_dim"]),
            "band": str(data.get("band", "")),
            "zeropoint": float(data.get("zeropoint", 0.0)),
            "flux_convention": str(data.get("flux_convention", "")),
            "image_scale": float(vqvae.config.get("image_scale", 1.0)),
            "psf_fwhm": psf_fwhm(psf_image, float(data["pixel_scale"])),
            "psf_description": "mean of the effective PSFs (pixel included) of the training stamps",
            "conditions": {k: list(v) if isinstance(v, (list, tuple)) else v
                           for k, v in prior_state.get("conditions", {"names": []}).items()},
            "vqvae_config": vqvae.config,
            "prior_config": prior.config,
            "training_data": {k: data.get(k) for k in ("source", "description", "seed", "n")
                              if k in data},
            "training": {"vqvae_steps": int(vq_state["step"]),
                         "prior_steps": int(prior_state["step"]),
                         "prior_test_bits_per_code": prior_state.get("test_bits_per_code")},
        }
        return cls(vqvae, prior, metadata, psf_image)

    def __repr__(self):
        m = self.metadata
        return (f"<galsim_vqvae.Emulator {m['stamp_size']}x{m['stamp_size']} at "
                f"{m['pixel_scale']}\"/pixel, band {m['band']!r}, {m['num_codes']} codes, "
                f"conditions {self.condition_names}>")

    # ----------------------------------------------------------------------------------------
    # Conditions
    def normalize_conditions(self, conditions, n, out_of_range="error"):
        """Check physical conditions and return them normalised for the prior, [n, C] float32.

        Parameters:
            conditions:     A dict label -> value or array of n values, or an array [n, C] in
                            `condition_names` order; None for an unconditional model.
            n:              The number of samples.
            out_of_range:   ``"error"`` raises on a value outside the training range;
                            ``"clip"`` clips it to the range with a warning. [default: "error"]
        """
        names = self.condition_names
        if not names:
            if conditions is not None and len(conditions):
                raise VQVAEInputError("this model is unconditional; it takes no conditions, "
                                      f"got {sorted(conditions) if isinstance(conditions, dict) else 'an array'}")
            return None
        if out_of_range not in OUT_OF_RANGE_POLICIES:
            raise VQVAEInputError(f"out_of_range must be one of {OUT_OF_RANGE_POLICIES}, "
                                  f"got {out_of_range!r}")
        if conditions is None:
            raise VQVAEInputError(f"this model is conditional; give conditions for {names}")
        if isinstance(conditions, dict):
            unknown = sorted(set(conditions) - set(names))
            missing = [k for k in names if k not in conditions]
            if unknown or missing:
                raise VQVAEInputError(f"conditions must name exactly {names}; "
                                      f"unknown: {unknown}, missing: {missing}")
            columns = []
            for k in names:
                v = np.asarray(conditions[k], dtype=np.float64)
                if v.ndim == 0:
                    v = np.full(n, float(v))
                if v.shape != (n,):
                    raise VQVAEInputError(f"condition {k!r} must be a number or an array of "
                                          f"{n} values, got shape {v.shape}")
                columns.append(v)
            values = np.stack(columns, axis=1)
        else:
            values = np.asarray(conditions, dtype=np.float64)
            if values.shape != (n, len(names)):
                raise VQVAEInputError(f"conditions array must have shape ({n}, {len(names)}) "
                                      f"for labels {names}, got {values.shape}")
        info = self.metadata["conditions"]
        lo, hi = np.asarray(info["min"], float), np.asarray(info["max"], float)
        for c, name in enumerate(names):
            col = values[:, c]
            if not np.all(np.isfinite(col)):
                raise VQVAEInputError(f"condition {name!r} has non-finite values")
            bad = (col < lo[c]) | (col > hi[c])
            if bad.any():
                msg = (f"condition {name!r} = {col[bad][0]:g} is outside the training range "
                       f"[{lo[c]:g}, {hi[c]:g}]")
                if out_of_range == "error":
                    raise VQVAEInputError(msg + " (out_of_range='clip', --out-of-range clip in the "
                                          "command, clips it)")
                warnings.warn(msg + "; clipped to the range", stacklevel=3)
                values[:, c] = np.clip(col, lo[c], hi[c])
        mean, std = np.asarray(info["mean"], float), np.asarray(info["std"], float)
        return torch.from_numpy(((values - mean) / std).astype(np.float32))

    # ----------------------------------------------------------------------------------------
    # Generation
    def sample_codes(self, n, conditions=None, seed=None, method="fast", temperature=1.0,
                     out_of_range="error", batch_size=None, progress=False, class_label=None):
        """Sample ``n`` code maps [n, latent, latent] (numpy int64) from the prior.

        Parameters:
            n:              How many code maps.
            conditions:     Physical labels (see `normalize_conditions`). [default: None]
            seed:           An int, None (fresh entropy), or a list of n ints, one per sample.
                            Each sample depends only on its own seed and conditions, never on the
                            batch it is drawn in. [default: None]
            method:         ``"fast"``: the cached sampler, each layer computed only where it
                            changes; ``"naive"``: the reference, the whole network once per
                            position. Both give the same code maps for the same seeds.
                            [default: "fast"]
            temperature:    Softmax temperature, > 0. [default: 1.0]
            out_of_range:   Policy for conditions outside the training range. [default: "error"]
            batch_size:     Code maps per sampler call; None: `default_batch_size` (256 on the
                            CPU, 4096 on a GPU). Does not change the maps. [default: None]
            progress:       Show a progress bar. [default: False]
            class_label:    Class labels [n] (ints) for a prior trained with classes, passed to
                            the sampler as they are; None for a prior without. [default: None]
        """
        latent = self.metadata["latent_size"]
        out = np.empty((_positive_count(n), latent, latent), np.int64)
        for start, stop, codes in self._code_chunks(n, conditions, seed, method, temperature,
                                                    out_of_range, batch_size, progress,
                                                    class_label):
            out[start:stop] = codes.cpu().numpy()
        return out

    def default_batch_size(self):
        """Maps sampled together when ``batch_size`` is None: 256 on the CPU (the C++ op splits
        them over the threads), 4096 on a GPU (the CUDA op's throughput grows up to about that
        batch; the caches take ``fast_sampling.cache_bytes`` per batch, 3.8 GB for the shipped
        10 x 64 prior at 4096)."""
        return 4096 if self.device.type == "cuda" else 256

    def _code_chunks(self, n, conditions, seed, method, temperature, out_of_range, batch_size,
                     progress, class_label):
        """Yields ``(start, stop, codes)``: the code maps of samples start..stop-1 as an int64
        tensor on the model's device, one sampler call of at most ``batch_size`` maps each."""
        n = _positive_count(n)
        batch_size = self.default_batch_size() if batch_size is None else batch_size
        batch_size = _positive_count(batch_size, "batch_size")
        if method not in _SAMPLERS:
            raise VQVAEInputError(f"sampling method {method!r} is not available; choose from "
                                  f"{list(_SAMPLERS)}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise VQVAEInputError(f"temperature must be a number > 0, got {temperature!r}")
        seeds = self._seeds(seed, n)
        cond = self.normalize_conditions(conditions, n, out_of_range)
        labels = None if class_label is None else np.asarray(class_label)
        latent = self.metadata["latent_size"]
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            c = None if cond is None else cond[start:stop].to(self.device)
            k = None if labels is None else labels[start:stop]
            with torch.no_grad():
                codes = _SAMPLERS[method](self.prior, stop - start, (latent, latent), cond=c,
                                          class_label=k, seeds=seeds[start:stop],
                                          temperature=float(temperature), progress=progress,
                                          batch_size=stop - start)
            yield start, stop, codes

    def sample(self, n, conditions=None, seed=None, **kwargs):
        """Sample ``n`` pre-PSF galaxy images [n, stamp, stamp] (numpy float32).

        Pixel values follow ``metadata["flux_convention"]``. Keyword arguments go to
        `sample_codes` (``class_label`` included). The code maps never leave the model's device:
        each chunk of ``batch_size`` maps is decoded there as soon as it is drawn, so the device
        holds one chunk's caches and images whatever ``n``. On a GPU a chunk is decoded on its own
        stream while the next chunk is sampled, and its images come back through pinned host
        memory asynchronously. The images are those of ``decode(sample_codes(...))`` (bit for bit
        where ``batch_size`` is a multiple of decode's 256, as by default; else up to the float32
        decoder's rounding at other batch sizes).
        """
        s = self.stamp_size
        out = np.empty((_positive_count(n), s, s), np.float32)
        chunks = self._code_chunks(n, conditions, seed, kwargs.pop("method", "fast"),
                                   kwargs.pop("temperature", 1.0),
                                   kwargs.pop("out_of_range", "error"),
                                   kwargs.pop("batch_size", None), kwargs.pop("progress", False),
                                   kwargs.pop("class_label", None))
        if kwargs:
            raise VQVAEInputError(f"sample: unknown keyword arguments {sorted(kwargs)}")
        if self.device.type != "cuda":
            for start, stop, codes in chunks:
                out[start:stop] = self._decode_tensor(codes).numpy()
            return out
        _decode_overlapped(self, chunks, out)
        return out

    @staticmethod
    def _seeds(seed, n):
        if seed is None or isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return per_sample_seeds(None if seed is None else int(seed), n)
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise VQVAEInputError(f"seed must be an int or a list of n={n} ints, "
                                  f"got a list of {len(seeds)}")
        return seeds

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding
    def _codes_tensor(self, codes):
        codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))  # native byte order
        latent, k = self.metadata["latent_size"], self.metadata["num_codes"]
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3 or codes.shape[1:] != (latent, latent):
            raise VQVAEInputError(f"code maps must have shape [n, {latent}, {latent}], "
                                  f"got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= k):
            raise VQVAEInputError(f"code values must lie in [0, {k - 1}], got "
                                  f"[{int(codes.min())}, {int(codes.max())}]")
        return codes

    def decode(self, codes, batch_size=256):
        """Decode code maps [n, latent, latent] into pre-PSF images [n, stamp, stamp] (numpy)."""
        return self._decode_tensor(self._codes_tensor(codes), batch_size).numpy()

    def _decode_tensor(self, codes, batch_size=256, out=None):
        """Images [n, stamp, stamp] float32 of code maps ``codes`` (int64 tensor, any device),
        decoded on the model's device ``batch_size`` maps at a time, into ``out`` (a tensor, on
        any device; a new CPU tensor if None)."""
        s = self.stamp_size
        if out is None:
            out = torch.empty((len(codes), s, s), dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, len(codes), batch_size):
                batch = codes[start:start + batch_size].to(self.device)
                out[start:start + len(batch)].copy_(self.vqvae.decode_codes(batch)[:, 0],
                                                    non_blocking=True)
        return out

    @property
    def stamp_size(self):
        return int(self.metadata["stamp_size"])

    def _stamps_tensor(self, images, what):
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        s = self.stamp_size
        if arr.ndim != 3 or arr.shape[1:] != (s, s):
            raise VQVAEInputError(f"{what} must have shape [n, {s}, {s}] (the model's stamp at "
                                  f"{self.metadata['pixel_scale']}\"/pixel), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise VQVAEInputError(f"{what} contains NaN or infinite values")
        return torch.from_numpy(arr)[:, None]

    def encode(self, observed, batch_size=256):
        """Encode observed stamps [n, stamp, stamp] into code maps [n, latent, latent] (numpy)."""
        x = self._stamps_tensor(observed, "observed")
        out = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                out.append(self.vqvae.encode_codes(x[start:start + batch_size].to(self.device))
                           .cpu())
        return torch.cat(out).numpy().astype(np.int64)

    def reconstruct(self, observed, psf, noise_sigma, convolved=False):
        """Deconvolved reconstruction of observed stamps through the VQ-VAE.

        Parameters:
            observed:       Observed stamps [n, stamp, stamp] at the model's pixel scale.
            psf:            Their PSF images (pixel included, sum 1), [stamp, stamp] for all or
                            [n, stamp, stamp].
            noise_sigma:    Their Gaussian noise sigma, a number or n numbers (> 0).
            convolved:      Return the reconstruction convolved with ``psf`` (comparable with
                            ``observed``) instead of the pre-PSF image. [default: False]

        Returns:
            (images [n, stamp, stamp], reduced chi^2 [n] of the convolved reconstruction).
        """
        from .nn.forward import chi2, convolve_psf

        x = self._stamps_tensor(observed, "observed")
        n = len(x)
        p = self._stamps_tensor(psf, "psf")
        if len(p) == 1:
            p = p.expand(n, -1, -1, -1)
        if len(p) != n:
            raise VQVAEInputError(f"psf must be one image or {n} images, got {len(p)}")
        sums = p.sum(dim=(1, 2, 3))
        if not bool((sums > 0).all()):
            raise VQVAEInputError("psf images must have a positive sum")
        p = p / sums[:, None, None, None]
        sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float32), (n,)).copy()
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise VQVAEInputError(f"noise_sigma must be finite and > 0, got {noise_sigma!r}")
        decoded = torch.from_numpy(self.decode(self.encode(observed)))[:, None]
        model = convolve_psf(decoded, p)
        red_chi2 = chi2(model, x, torch.from_numpy(sigma)).numpy()
        images = model if convolved else decoded
        return images[:, 0].numpy(), red_chi2


# --------------------------------------------------------------------------------------------
# Bundle reading and checking
def _decode_overlapped(emulator, chunks, out):
    """GPU pipeline of `Emulator.sample`: each chunk ``(start, stop, codes)`` (codes on the GPU)
    is decoded on a side stream into one of two pinned host buffers (asynchronous copies) while
    the caller's stream samples the next chunk; a buffer is copied into ``out`` (numpy) once the
    chunk that filled it is done, before it is reused."""
    device = emulator.device
    stream = torch.cuda.Stream(device)
    s = emulator.stamp_size
    buffers, pending = {}, {}

    def drain(slot):
        event, start, stop = pending.pop(slot)
        event.synchronize()
        out[start:stop] = buffers[slot][:stop - start].numpy()

    for q, (start, stop, codes) in enumerate(chunks):
        slot = q % 2
        if slot in pending:
            drain(slot)
        if slot not in buffers or len(buffers[slot]) < stop - start:
            buffers[slot] = torch.empty((stop - start, s, s), dtype=torch.float32,
                                        pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(device))  # the codes are drawn
        with torch.cuda.stream(stream):
            codes.record_stream(stream)
            emulator._decode_tensor(codes, out=buffers[slot])
            event = torch.cuda.Event()
            event.record(stream)
        pending[slot] = (event, start, stop)
    for slot in sorted(pending, key=lambda k: pending[k][1]):
        drain(slot)


def _read_bundle(path):
    from safetensors.torch import load_file
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ... all mean "unreadable"
        raise VQVAEFormatError(f"model file {path} is corrupt or truncated "
                               f"(not a readable safetensors file: {err})") from None
    if _HEADER_KEY not in header:
        raise VQVAEFormatError(f"model file {path} is a safetensors file but not a galsim_vqvae "
                               f"model (no '{_HEADER_KEY}' metadata in its header)")
    try:
        metadata = json.loads(header[_HEADER_KEY])
    except (TypeError, ValueError) as err:
        raise VQVAEFormatError(f"model file {path}: metadata is not valid JSON ({err})") from None
    if not isinstance(metadata, dict):
        raise VQVAEFormatError(f"model file {path}: metadata is not a JSON object")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise VQVAEFormatError(f"model file {path} has format_version {version!r}; this "
                               f"galsim_vqvae reads version {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise VQVAEFormatError(f"model file {path}: metadata lacks {missing}")
    return tensors, metadata


def _build(cls, config, field, path, tensors, prefix):
    """The network that metadata field ``field`` describes, with the weights ``prefix*`` of the
    file. Its tensor names and shapes are checked on the ``meta`` device first, so that metadata
    contradicting the weights (even absurdly large sizes) is an error, never an allocation."""
    if not isinstance(config, dict):
        raise VQVAEFormatError(f"model file {path}: metadata field {field!r} is not an object")

    def make():
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(**config)

    # No size of a network can exceed the largest tensor, nor a count the number of tensors,
    # of the file: a larger value is refused before it makes (even meta) modules by the million.
    mine = [v for k, v in tensors.items() if k.startswith(prefix)]
    bound = max([len(mine)] + [v.numel() for v in mine])
    for key in _SIZE_FIELDS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise VQVAEFormatError(f"model file {path}: metadata field {field!r} has {key} = "
                                   f"{value!r}, more than the file's weights can hold")
    try:
        with torch.device("meta"):
            skeleton = make()
    except Exception as err:  # noqa: BLE001 - whatever the constructor makes of bad values
        raise VQVAEFormatError(f"model file {path}: metadata field {field!r} does not describe "
                               f"a {cls.__name__}: {type(err).__name__}: {err}") from None
    given = _matching_state(skeleton, tensors, prefix, path)
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the
        module = make()                        # caller's random state alone
    module.load_state_dict(given)
    return module


def _matching_state(module, tensors, prefix, path):
    """The tensors ``prefix*`` of the file as ``module``'s state dict, checked: the same names and
    shapes, floating-point values finite."""
    expected = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise VQVAEFormatError(f"model file {path}: weights do not match the metadata's "
                               f"{type(module).__name__}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(given[k].shape) != tuple(v.shape):
            raise VQVAEFormatError(f"model file {path}: tensor {prefix}{k} has shape "
                                   f"{tuple(given[k].shape)}, the metadata implies "
                                   f"{tuple(v.shape)}")
        if given[k].is_floating_point() and not bool(torch.isfinite(given[k]).all()):
            raise VQVAEFormatError(f"model file {path}: tensor {prefix}{k} holds NaN or "
                                   "infinite values")
    return given


def _check_metadata(metadata, path):
    """Types and ranges of the metadata fields (`_REQUIRED_METADATA`), each error naming the
    field and its value."""
    def fail(field, what):
        value = metadata.get(field) if "." not in field else None
        raise VQVAEFormatError(f"model file {path}: metadata field {field!r}"
                               + (f" = {value!r}" if value is not None else "")
                               + f" must be {what}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    for field in ("stamp_size", "latent_size", "num_codes"):
        if not is_int(metadata[field]) or metadata[field] < 1:
            fail(field, "a positive integer")
    for field in ("pixel_scale", "psf_fwhm"):
        if not is_number(metadata[field]) or not metadata[field] > 0:
            fail(field, "a positive number")
    if not is_number(metadata["zeropoint"]):
        fail("zeropoint", "a finite number")
    for field in ("band", "flux_convention"):
        if not isinstance(metadata[field], str):
            fail(field, "a string")
    for field in ("conditions", "training_data"):
        if not isinstance(metadata[field], dict):
            fail(field, "an object")
    cond = metadata["conditions"]
    names = cond.get("names", [])
    if not isinstance(names, list) or not all(isinstance(k, str) for k in names) \
            or len(set(names)) != len(names):
        fail("conditions.names", f"a list of distinct label names, not {names!r}")
    if names:
        for key in ("mean", "std", "min", "max"):
            values = cond.get(key)
            if not isinstance(values, list) or len(values) != len(names) \
                    or not all(is_number(v) for v in values):
                fail(f"conditions.{key}", f"a list of {len(names)} finite numbers, one for each of the "
                     f"condition labels {names}, not {values!r}")
        for k, lo, hi, sd in zip(names, cond["min"], cond["max"], cond["std"]):
            if not (lo <= hi and sd > 0):
                fail("conditions", f"consistent for label {k!r}: min {lo} <= max {hi} and "
                     f"std {sd} > 0")


def _check_consistency(vqvae, prior, metadata, psf_image, path):
    def fail(msg):
        raise VQVAEFormatError(f"model file {path}: {msg}")

    s, latent, k = metadata["stamp_size"], metadata["latent_size"], metadata["num_codes"]
    if vqvae.config.get("stamp_size") != s:
        fail(f"metadata stamp_size {s} contradicts the VQ-VAE's {vqvae.config.get('stamp_size')}")
    if vqvae.config.get("num_codes") != k or prior.config.get("num_codes") != k:
        fail(f"metadata num_codes {k} contradicts the networks' "
             f"({vqvae.config.get('num_codes')}, {prior.config.get('num_codes')})")
    if latent * 4 != s:
        fail(f"latent_size {latent} does not match stamp_size {s} (expected {s // 4})")
    names = metadata["conditions"].get("names", [])
    if len(names) != prior.config.get("cond_dim", 0):
        fail(f"{len(names)} condition labels {names} but the prior takes "
             f"{prior.config.get('cond_dim', 0)}")
    for key in ("mean", "std", "min", "max"):
        if names and len(metadata["conditions"].get(key, [])) != len(names):
            fail(f"conditions.{key} must have {len(names)} entries")
    if psf_image.shape != (s, s):
        fail(f"psf_image has shape {psf_image.shape}, expected ({s}, {s})")
    if not (np.all(np.isfinite(psf_image)) and psf_image.sum() > 0):
        fail("psf_image must be finite with a positive sum")
    if not (metadata["pixel_scale"] > 0):
        fail(f"pixel_scale must be > 0, got {metadata['pixel_scale']}")


def _mean_training_psf(dataset_path):
    from .data.dataset import load_arrays

    arrays = load_arrays(dataset_path, keys=("psf_bank", "psf_index"))
    counts = np.bincount(arrays["psf_index"], minlength=len(arrays["psf_bank"]))
    return np.tensordot(counts / counts.sum(), arrays["psf_bank"].astype(np.float64), axes=1)


def psf_fwhm(psf_image, pixel_scale):
    """Gaussian-equivalent FWHM in arcsec of a PSF image: 2.355 times its HSM adaptive-moments
    sigma. (GalSim's ``calculateFWHM`` is unreliable on diffraction PSFs with struts.)"""
    import galsim

    image = galsim.Image(np.asarray(psf_image, dtype=np.float64), scale=pixel_scale)
    sigma = galsim.hsm.FindAdaptiveMom(image).moments_sigma
    return float(2.0 * np.sqrt(2.0 * np.log(2.0)) * sigma * pixel_scale)

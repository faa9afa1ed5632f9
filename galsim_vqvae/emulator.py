"""The Emulator: a trained VQ-VAE, its Gated PixelCNN prior and their metadata, as one bundle.

A bundle is a single ``.safetensors`` file: the weights of both networks, the training PSF
image and the labels of the training galaxies (``labels.table``, from which labels that a user
leaves out are drawn: `Emulator.draw_conditions`) as tensors, and the metadata as JSON in the
file's header. Loading never unpickles anything;
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
LABEL_TABLE_KEY = "labels.table"   # the bundle's tensor of training labels [N, labels]
MAX_LABEL_ROWS = 20_000            # a larger training split is subsampled (seeded)
_LABEL_SALT = 0x4C41_4245          # "LABE": label draws apart from the sampler's noise stream
FRAME_PIXELS = 4                   # the outer frame whose pixels estimate a stamp's noise
PSF_LOST_FLUX = 1e-3               # cropping a larger PSF to the stamp warns beyond this loss


def _absent(column):
    """Where a label column of `Emulator.check_conditions` holds no value."""
    return column < 0 if column.dtype.kind == "i" else np.isnan(column)


def _label_uniform(seed):
    """The uniform number in [0, 1) that picks galaxy ``seed``'s row of the label table."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _LABEL_SALT])).random()


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
        label_table: The labels of the training galaxies, [N, len(label_names)] (continuous
                    labels in `condition_names` order, then the class label's numbers), from
                    which `draw_conditions` draws missing labels; None for a model without.
                    [default: None]
    """

    def __init__(self, vqvae, prior, metadata, psf_image, label_table=None):
        self.vqvae = vqvae.eval()
        self.prior = prior.eval()
        self.metadata = json.loads(json.dumps(metadata))  # a deep copy, JSON-clean
        self.psf_image = np.asarray(psf_image, dtype=np.float32)
        missing = [k for k in _REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise VQVAEFormatError(f"model <in memory>: metadata lacks {missing}")
        self.metadata["conditions"].pop("table", None)
        self.label_table = None
        if label_table is not None:
            self.label_table = np.ascontiguousarray(label_table, dtype=np.float32)
            self.metadata["conditions"]["table"] = {
                "columns": self.label_names, "rows": int(len(self.label_table)),
                "description": "labels of the training galaxies (the training split, a seeded "
                               f"subsample of at most {MAX_LABEL_ROWS} rows)"}
        _check_metadata(self.metadata, "<in memory>")
        _check_consistency(self.vqvae, self.prior, self.metadata, self.psf_image, "<in memory>")
        _check_label_table(self.label_table, self.metadata, "<in memory>")

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
        table = tensors.get(LABEL_TABLE_KEY)
        emulator.label_table = None if table is None else table.float().numpy()
        _check_consistency(vqvae, prior, metadata, emulator.psf_image, path)
        _check_label_table(emulator.label_table, metadata, path)
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
        if self.label_table is not None:
            tensors[LABEL_TABLE_KEY] = torch.from_numpy(np.ascontiguousarray(self.label_table))
        metadata = dict(self.metadata, format_version=FORMAT_VERSION)
        payload = save(tensors, metadata={_HEADER_KEY: json.dumps(metadata)})
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a full disk: an OSError naming it
            f.write(payload)

    @classmethod
    def from_checkpoints(cls, vqvae_checkpoint, prior_checkpoint, psf_image, label_table=None,
                         noise_sigma=None):
        """Assemble a bundle from the checkpoints written by ``train-vqvae`` and ``train-prior``.

        The bundle holds the labels of the prior's training split (`label_table`, read from the
        dataset the prior was trained on), from which `draw_conditions` draws missing labels.

        Parameters:
            vqvae_checkpoint:   Path of the VQ-VAE's ``checkpoint.pt``.
            prior_checkpoint:   Path of the prior's ``checkpoint.pt``.
            psf_image:          The training PSF image, e.g. the mean PSF of the stamps the
                                VQ-VAE was trained on (`galsim_vqvae.data.dataset.mean_psf`, as
                                ``train-prior`` does).
            label_table:        The labels of the prior's training split, [m, C] in the order of
                                its conditions then its class label (``train-prior`` passes
                                `galsim_vqvae.train.prior.label_table`), or None for a bundle
                                that cannot draw missing labels. [default: None]
            noise_sigma:        The median noise sigma of the VQ-VAE's training stamps, the
                                reference of `input_scale` (``train-prior`` passes
                                `galsim_vqvae.data.dataset.median_sigma`), or None: stamps are
                                then put on the training scale by their peak. [default: None]
        """
        from .checkpoints import load_checkpoint

        vq_state = load_checkpoint(vqvae_checkpoint)
        prior_state = load_checkpoint(prior_checkpoint)
        vqvae = VQVAE.from_config(vq_state["config"])
        vqvae.load_state_dict(vq_state["model"])
        prior = GatedPixelCNN(**prior_state["config"])
        prior.load_state_dict(prior_state["model"])
        data = dict(vq_state["data"])
        psf_image = np.asarray(psf_image, dtype=np.float64)
        psf_image = (psf_image / psf_image.sum()).astype(np.float32)
        latent = vqvae.config["stamp_size"] // 4
        conditions = {k: list(v) if isinstance(v, (list, tuple)) else v
                      for k, v in prior_state.get("conditions", {"names": []}).items()}
        classes = prior_state.get("classes") or {}
        class_label = classes.get("label")
        if prior.config.get("num_classes", 0):
            if not class_label:
                raise VQVAEInputError(f"{prior_checkpoint}: the prior is class-conditional "
                                      f"(num_classes={prior.config['num_classes']}) but its "
                                      "checkpoint names no class label")
            conditions["class_label"] = {"name": str(class_label),
                                         "class_names": list(classes["names"])}
        table = None if label_table is None else np.asarray(label_table, dtype=np.float32)
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
            "conditions": conditions,
            "vqvae_config": vqvae.config,
            "prior_config": prior.config,
            "training_data": {k: data.get(k) for k in ("source", "description", "seed", "n")
                              if k in data},
            "training": {"vqvae_steps": int(vq_state["step"]),
                         "prior_steps": int(prior_state["step"]),
                         "prior_test_bits_per_code": prior_state.get("test_bits_per_code")},
        }
        if noise_sigma is not None:
            metadata["noise_sigma_median"] = float(noise_sigma)
        return cls(vqvae, prior, metadata, psf_image, table)

    def __repr__(self):
        m = self.metadata
        return (f"<galsim_vqvae.Emulator {m['stamp_size']}x{m['stamp_size']} at "
                f"{m['pixel_scale']}\"/pixel, band {m['band']!r}, {m['num_codes']} codes, "
                f"conditions {self.condition_names}>")

    # ----------------------------------------------------------------------------------------
    # Conditions: the labels each galaxy is generated with
    @property
    def class_label(self):
        """The name of the class label the prior is conditioned on (e.g. ``"morph_class"``), or
        None."""
        info = self.metadata["conditions"].get("class_label")
        return info["name"] if info else None

    @property
    def class_names(self):
        """The names of the classes of `class_label`, in the order of their integer values."""
        info = self.metadata["conditions"].get("class_label")
        return list(info["class_names"]) if info else []

    @property
    def label_names(self):
        """Every label a galaxy is generated with: `condition_names`, then `class_label`."""
        return self.condition_names + ([self.class_label] if self.class_label else [])

    def _range_text(self):
        info = self.metadata["conditions"]
        parts = [f"{k} in [{lo:g}, {hi:g}]" for k, lo, hi in
                 zip(self.condition_names, info.get("min", []), info.get("max", []))]
        if self.class_label:
            parts.append(f"{self.class_label} one of {self.class_names}")
        return ", ".join(parts)

    def check_conditions(self, conditions, n, out_of_range="error"):
        """Check the labels given for ``n`` galaxies: the one place where conditions are checked.

        Parameters:
            conditions:     None, a dict label -> a value or n values, a list of n such dicts
                            (one per galaxy, each naming any subset of the labels), or an array
                            [n, C] of every continuous label in `condition_names` order. The
                            class label (`class_label`) is given by name (``"bulge"``) or number.
            n:              The number of galaxies.
            out_of_range:   ``"error"`` raises on a continuous value outside the training range;
                            ``"clip"`` clips it to the range with a warning. [default: "error"]

        Returns:
            A dict label -> array [n] (float64; int64 for the class label) of the labels given;
            a label not given for some galaxies holds NaN there (-1 for the class label).

        Raises:
            VQVAEInputError naming the label and the value; for a value outside its range the
            error has ``value_range = (value, min, max)``.
        """
        if out_of_range not in OUT_OF_RANGE_POLICIES:
            raise VQVAEInputError(f"out_of_range must be one of {OUT_OF_RANGE_POLICIES}, "
                                  f"got {out_of_range!r}")
        names = self.label_names
        if conditions is None:
            return {}
        if not names:
            if len(conditions):
                what = sorted(conditions) if isinstance(conditions, dict) else "some"
                raise VQVAEInputError(f"this model is unconditional; it takes no conditions, "
                                      f"got {what}")
            return {}
        columns = self._condition_columns(conditions, n)
        unknown = sorted(set(columns) - set(names))
        if unknown:
            raise VQVAEInputError(f"conditions name unknown label(s) {unknown}; this model's "
                                  f"labels are {names}")
        out = {}
        info = self.metadata["conditions"]
        for c, name in enumerate(self.condition_names):
            if name not in columns:
                continue
            try:
                col = np.array([np.nan if v is None else v for v in columns[name]],
                               dtype=np.float64)
            except (TypeError, ValueError):
                raise VQVAEInputError(f"condition {name!r} must be a number, got "
                                      f"{next(v for v in columns[name] if v is not None)!r}"
                                      ) from None
            given = np.array([v is not None for v in columns[name]])
            if not np.all(np.isfinite(col[given])):
                raise VQVAEInputError(f"condition {name!r} has non-finite values")
            lo, hi = float(info["min"][c]), float(info["max"][c])
            bad = given & ((col < lo) | (col > hi))
            if bad.any():
                value = float(col[bad][0])
                msg = (f"condition {name!r} = {value:g} is outside the training range "
                       f"[{lo:g}, {hi:g}]")
                if out_of_range == "error":
                    err = VQVAEInputError(msg + " (out_of_range='clip' in Python or in "
                                          "vqvae_model, --out-of-range clip in the command, "
                                          "clips it)")
                    err.value_range = (value, lo, hi)
                    raise err
                warnings.warn(msg + "; clipped to the range", stacklevel=3)
                col[bad] = np.clip(col[bad], lo, hi)
            out[name] = col
        if self.class_label in columns:
            out[self.class_label] = np.array([self._class_number(v) for v in
                                              columns[self.class_label]], dtype=np.int64)
        return out

    def _condition_columns(self, conditions, n):
        """Conditions as a dict label -> list of n values (None where not given)."""
        if isinstance(conditions, dict):
            out = {}
            for k, v in conditions.items():
                arr = np.asarray(v, dtype=object if isinstance(v, str) or np.ndim(v) and
                                 any(isinstance(x, str) for x in np.ravel(v)) else None)
                if arr.ndim == 0:
                    out[k] = [v] * n
                elif arr.shape == (n,):
                    out[k] = list(arr.tolist())
                else:
                    raise VQVAEInputError(f"condition {k!r} must be a value or an array of "
                                          f"{n} values, got shape {arr.shape}")
            return out
        if isinstance(conditions, (list, tuple)) and conditions and \
                all(isinstance(c, dict) or c is None for c in conditions):
            if len(conditions) != n:
                raise VQVAEInputError(f"conditions: a list of {len(conditions)} dicts for "
                                      f"n={n} galaxies")
            keys = sorted({k for c in conditions if c for k in c})
            return {k: [(c or {}).get(k) for c in conditions] for k in keys}
        names = self.condition_names
        values = np.asarray(conditions, dtype=np.float64)
        if values.shape != (n, len(names)):
            raise VQVAEInputError(f"conditions array must have shape ({n}, {len(names)}) "
                                  f"for labels {names}, got {values.shape}")
        return {k: list(values[:, i]) for i, k in enumerate(names)}

    def _class_number(self, value):
        """The integer of a class given by name or number (-1: not given)."""
        if value is None:
            return -1
        names = self.class_names
        if isinstance(value, str):
            if value in names:
                return names.index(value)
            if not value.strip().lstrip("-").isdigit():
                raise VQVAEInputError(f"{self.class_label} = {value!r} is not a class of this "
                                      f"model; its classes are {names}")
            value = int(value)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value < len(names):
            raise VQVAEInputError(f"{self.class_label} = {value!r} is not a class of this model: "
                                  f"give a name of {names} or a number from 0 to "
                                  f"{len(names) - 1}")
        return int(value)

    def draw_conditions(self, n, conditions=None, seed=None, out_of_range="error"):
        """The labels of ``n`` galaxies: those given, checked (see `check_conditions`), and the
        missing ones drawn from the training population stored in the bundle (`label_table`).

        Galaxy i's missing labels are those of one row of the table, picked with a uniform
        number drawn from its own seed (``SeedSequence([seed_i, 0x4C41_4245])``), so they depend
        on its seed and given labels alone, never on the batch. A row is picked with
        probability proportional to a Gaussian kernel in the given continuous labels, each
        divided by its standard deviation in the table: ``exp(-d^2 / 2 h^2)`` with ``h =
        N^(-1/(d+4))`` (Scott's rule for N rows and d given labels), the nearest row always
        possible; among the rows of the given class only, if the class is given. With nothing
        given, every row is equally likely: the training population itself.

        Parameters:
            n:              The number of galaxies.
            conditions:     The labels given (any subset; see `check_conditions`).
                            [default: None]
            seed:           An int, None (fresh entropy), or a list of n per-galaxy seeds, as
                            for `sample_codes` (the same seeds give the same labels).
                            [default: None]
            out_of_range:   Policy for given values outside the training range.
                            [default: "error"]

        Returns:
            A dict label -> array [n] of every label of the model (`label_names`): float64, the
            class label int64.
        """
        n = _positive_count(n)
        return self.fill_conditions(self.check_conditions(conditions, n, out_of_range), n,
                                    self._seeds(seed, n))

    def fill_conditions(self, given, n, seeds):
        """`draw_conditions` on labels already checked: ``given`` is the output of
        `check_conditions` for ``n`` galaxies, ``seeds`` their n per-galaxy seeds."""
        names = self.label_names
        if not names:
            return {}
        out = {k: given[k].copy() if k in given else
               np.full(n, -1, np.int64) if k == self.class_label else np.full(n, np.nan)
               for k in names}
        absent = {k: _absent(out[k]) for k in names}
        todo = np.logical_or.reduce([absent[k] for k in names])
        if not todo.any():
            return out
        if self.label_table is None:
            absent = [k for k in names if absent[k].any()]
            raise VQVAEInputError(
                f"this model has no table of training labels, so it cannot draw the missing "
                f"label(s) {absent}: give every label (conditions= in Python, --conditions in the "
                f"command, gal.conditions in a config); training ranges: {self._range_text()}")
        table = self.label_table.astype(np.float64)
        groups = {}  # galaxies with the same given labels share one set of row weights
        for i in np.flatnonzero(todo):
            key = tuple((k, out[k][i].item()) for k in names if not absent[k][i])
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            cdf = self._label_cdf(table, dict(key))
            u = np.array([_label_uniform(seeds[i]) for i in members])
            rows = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(table) - 1)
            for c, k in enumerate(names):
                if k not in dict(key):
                    out[k][members] = table[rows, c].astype(out[k].dtype)
        info = self.metadata["conditions"]  # float32 table rounding: keep to the ranges
        for c, k in enumerate(self.condition_names):
            out[k] = np.clip(out[k], info["min"][c], info["max"][c])
        return out

    def _label_cdf(self, table, pattern):
        """Cumulative weights of the table's rows given the labels ``pattern`` (see
        `draw_conditions`)."""
        eligible = np.ones(len(table), dtype=bool)
        names = self.label_names
        if self.class_label in pattern:
            eligible = table[:, names.index(self.class_label)] == pattern[self.class_label]
            if not eligible.any():
                raise VQVAEInputError(
                    f"{self.class_label} = {self.class_names[pattern[self.class_label]]!r}: no "
                    f"galaxy of that class in the model's table of training labels")
        given = [k for k in self.condition_names if k in pattern]
        if not given:
            return np.cumsum(eligible.astype(np.float64))
        cols = [names.index(k) for k in given]
        scale = table[:, cols].std(axis=0)
        scale[~(scale > 0)] = 1.0
        h = len(table) ** (-1.0 / (len(cols) + 4))
        d2 = (((table[:, cols] - np.array([pattern[k] for k in given])) / (h * scale)) ** 2
              ).sum(axis=1)
        d2 = np.where(eligible, d2, np.inf)
        return np.cumsum(np.exp(-0.5 * (d2 - d2.min())))

    def _prior_inputs(self, labels, start, stop):
        """The prior's inputs for galaxies start..stop-1 of complete ``labels``: normalised
        continuous labels [m, C] and class numbers [m], each None if the model has none."""
        names = self.condition_names
        cond = klass = None
        if names:
            info = self.metadata["conditions"]
            values = np.stack([labels[k][start:stop] for k in names], axis=1)
            cond = torch.from_numpy(((values - np.asarray(info["mean"], float))
                                     / np.asarray(info["std"], float)).astype(np.float32))
        if self.class_label:
            klass = torch.from_numpy(np.asarray(labels[self.class_label][start:stop], np.int64))
        return cond, klass

    # ----------------------------------------------------------------------------------------
    # Generation
    def sample_codes(self, n, conditions=None, seed=None, method="fast", temperature=1.0,
                     out_of_range="error", batch_size=None, progress=False):
        """Sample ``n`` code maps [n, latent, latent] (numpy int64) from the prior.

        Parameters:
            n:              How many code maps.
            conditions:     Labels, any subset (see `check_conditions`); the missing ones are
                            drawn from the training population (see `draw_conditions`).
                            [default: None]
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
        """
        latent = self.metadata["latent_size"]
        out = np.empty((_positive_count(n), latent, latent), np.int64)
        for start, stop, codes in self._code_chunks(n, conditions, seed, method, temperature,
                                                    out_of_range, batch_size, progress):
            out[start:stop] = codes.cpu().numpy()
        return out

    def default_batch_size(self):
        """Maps sampled together when ``batch_size`` is None: 256 on the CPU (the C++ op splits
        them over the threads), 4096 on a GPU (the CUDA op's throughput grows up to about that
        batch; the caches take ``fast_sampling.cache_bytes`` per batch: 4.5 GB for the shipped
        10 x 96 prior at 4096)."""
        return 4096 if self.device.type == "cuda" else 256

    def _code_chunks(self, n, conditions, seed, method, temperature, out_of_range, batch_size,
                     progress):
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
        labels = self.draw_conditions(n, conditions, seeds, out_of_range)
        latent = self.metadata["latent_size"]
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            c, k = (None if t is None else t.to(self.device)
                    for t in self._prior_inputs(labels, start, stop))
            with torch.no_grad():
                codes = _SAMPLERS[method](self.prior, stop - start, (latent, latent), cond=c,
                                          class_label=k, seeds=seeds[start:stop],
                                          temperature=float(temperature), progress=progress,
                                          batch_size=stop - start)
            yield start, stop, codes

    def sample(self, n, conditions=None, seed=None, **kwargs):
        """Sample ``n`` pre-PSF galaxy images [n, stamp, stamp] (numpy float32).

        Pixel values follow ``metadata["flux_convention"]``. Keyword arguments go to
        `sample_codes`. The code maps never leave the model's device:
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
                                   kwargs.pop("batch_size", None), kwargs.pop("progress", False))
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

    def input_scale(self, observed, noise_sigma=None):
        """The factor [n] (float64) by which `encode` multiplies each stamp, so that stamps in any
        flux unit reach the network as the training stamps did: the noise sigma of the stamp
        becomes the training stamps' median sigma (``metadata["noise_sigma_median"]``).

        A stamp's sigma is ``noise_sigma`` if given, else 1.4826 times the median absolute
        deviation of the pixels of its outer frame (`FRAME_PIXELS` wide). A noiseless stamp (sigma
        0), or a model whose metadata lacks the training sigma, is instead scaled so that its
        brightest pixel is the training stamps' median brightest pixel (the VQ-VAE's
        ``image_scale``). The factor is homogeneous: a stamp k times brighter (with k times the
        sigma) gets a factor 1/k, so that encoding is independent of the flux unit.

        Parameters:
            observed:       Stamps [n, stamp, stamp].
            noise_sigma:    Their noise sigma, a number or n numbers, or None to estimate it.
                            [default: None]
        """
        x = np.asarray(observed, dtype=np.float64)
        x = x[None] if x.ndim == 2 else x
        n = len(x)
        if noise_sigma is None:
            s = x.shape[-1]
            i = np.arange(s)
            depth = np.minimum(i, s - 1 - i)  # distance of a row or column from the edge
            frame = x[:, np.minimum.outer(depth, depth) < FRAME_PIXELS]
            sigma = 1.4826 * np.median(np.abs(frame - np.median(frame, axis=1)[:, None]), axis=1)
        else:
            sigma = np.asarray(noise_sigma, dtype=np.float64)
            if sigma.shape not in ((), (n,)) or not np.all(np.isfinite(sigma) & (sigma >= 0)):
                raise VQVAEInputError(f"noise_sigma must be a finite number >= 0 or {n} of them, "
                                      f"got {noise_sigma!r}")
            sigma = np.broadcast_to(sigma, (n,))
        reference = self.metadata.get("noise_sigma_median")
        peak = x.reshape(n, -1).max(axis=1)
        by_peak = np.where(peak > 0, self.vqvae.image_scale / np.where(peak > 0, peak, 1.0), 1.0)
        if not reference:
            return by_peak
        return np.where(sigma > 0, reference / np.where(sigma > 0, sigma, 1.0), by_peak)

    def encode(self, observed, batch_size=256, noise_sigma=None):
        """Encode observed stamps [n, stamp, stamp] into code maps [n, latent, latent] (numpy).

        The stamps are first brought to the training range by `input_scale`, so the codes do
        not depend on the flux unit of the stamps.

        Parameters:
            observed:       Stamps [n, stamp, stamp] at the model's pixel scale.
            batch_size:     Stamps per network call. [default: 256]
            noise_sigma:    Their noise sigma (a number or n numbers), or None to estimate it
                            from each stamp (see `input_scale`). [default: None]
        """
        return self._encode(observed, batch_size, noise_sigma)[0]

    def _encode(self, observed, batch_size, noise_sigma):
        """(codes, the factors of `input_scale`)."""
        x = self._stamps_tensor(observed, "observed").numpy()
        factor = self.input_scale(x[:, 0], noise_sigma)
        x = torch.from_numpy((x * factor[:, None, None, None]).astype(np.float32))
        out = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                out.append(self.vqvae.encode_codes(x[start:start + batch_size].to(self.device))
                           .cpu())
        return torch.cat(out).numpy().astype(np.int64), factor

    def reconstruct(self, observed, psf, noise_sigma, convolved=False):
        """Deconvolved reconstruction of observed stamps through the VQ-VAE.

        Parameters:
            observed:       Observed stamps [n, stamp, stamp] at the model's pixel scale.
            psf:            Their PSF images (pixel included; normalised to sum 1), one
                            [ny, nx] for all or [n, ny, nx], of any size: padded or cropped about
                            the centre to the stamp (`fit_psf`).
            noise_sigma:    Their Gaussian noise sigma, a number or n numbers (> 0).
            convolved:      Return the reconstruction convolved with ``psf`` (comparable with
                            ``observed``) instead of the pre-PSF image. [default: False]

        The stamps are brought to the training range (`input_scale`, from ``noise_sigma``) and
        the result is scaled back: the reconstruction does not depend on the flux unit.

        Returns:
            (images [n, stamp, stamp], reduced chi^2 [n] of the convolved reconstruction).
        """
        from .nn.forward import chi2, convolve_psf

        x = self._stamps_tensor(observed, "observed")
        n = len(x)
        psf = np.asarray(psf, dtype=np.float32)
        if not np.all(np.isfinite(psf)):
            raise VQVAEInputError("psf contains NaN or infinite values")
        p = torch.from_numpy(fit_psf(psf, self.stamp_size))
        p = (p[None] if p.ndim == 2 else p)[:, None]
        if len(p) == 1:
            p = p.expand(n, -1, -1, -1)
        if p.ndim != 4 or len(p) != n:
            raise VQVAEInputError(f"psf must be one image or {n} images, got shape {psf.shape}")
        sums = p.sum(dim=(1, 2, 3))
        if not bool((sums > 0).all()):
            raise VQVAEInputError("psf images must have a positive sum")
        p = p / sums[:, None, None, None]
        sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float32), (n,)).copy()
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise VQVAEInputError(f"noise_sigma must be finite and > 0, got {noise_sigma!r}")
        codes, factor = self._encode(observed, 256, sigma.astype(np.float64))
        decoded = torch.from_numpy((self.decode(codes) / factor[:, None, None])
                                   .astype(np.float32))[:, None]
        model = convolve_psf(decoded, p)
        red_chi2 = chi2(model, x, torch.from_numpy(sigma)).numpy()
        images = model if convolved else decoded
        return images[:, 0].numpy(), red_chi2


# --------------------------------------------------------------------------------------------
# Bundle reading and checking
def _is_torch_checkpoint(path):
    """Whether ``path`` is a file written by ``torch.save`` (a zip archive holding a pickle), as
    the training checkpoints are; it is only inspected, never unpickled."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
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
        if _is_torch_checkpoint(path):
            bundle = os.path.join(os.path.dirname(path), "model.safetensors")
            here = f" (here: {bundle})" if os.path.isfile(bundle) else ""
            raise VQVAEFormatError(
                f"model file {path} is a training checkpoint, not a model bundle: give the bundle "
                "model.safetensors that `galsim-vqvae train-prior` writes in its --out folder"
                + here) from None
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
    if "noise_sigma_median" in metadata and not (is_number(metadata["noise_sigma_median"])
                                                 and metadata["noise_sigma_median"] > 0):
        fail("noise_sigma_median", "a positive number")
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
    klass = cond.get("class_label")
    if klass is not None:
        if not (isinstance(klass, dict) and isinstance(klass.get("name"), str)
                and klass["name"] not in names and isinstance(klass.get("class_names"), list)
                and klass["class_names"]
                and all(isinstance(c, str) for c in klass["class_names"])
                and len(set(klass["class_names"])) == len(klass["class_names"])):
            fail("conditions.class_label", "an object {name: a label name other than the "
                 f"continuous ones, class_names: a list of distinct names}}, not {klass!r}")


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
    klass = metadata["conditions"].get("class_label")
    if (len(klass["class_names"]) if klass else 0) != prior.config.get("num_classes", 0):
        fail(f"{len(klass['class_names']) if klass else 0} class names but the prior takes "
             f"{prior.config.get('num_classes', 0)} classes")
    if psf_image.shape != (s, s):
        fail(f"psf_image has shape {psf_image.shape}, expected ({s}, {s})")
    if not (np.all(np.isfinite(psf_image)) and psf_image.sum() > 0):
        fail("psf_image must be finite with a positive sum")
    if not (metadata["pixel_scale"] > 0):
        fail(f"pixel_scale must be > 0, got {metadata['pixel_scale']}")


def _check_label_table(table, metadata, path):
    """The label table (or its absence) must agree with the metadata: a column per label, the
    values finite and (to float32 rounding) within the training ranges, class numbers valid."""
    def fail(msg):
        raise VQVAEFormatError(f"model file {path}: {msg}")

    cond = metadata["conditions"]
    described = cond.get("table")
    if table is None:
        if described is not None:
            fail(f"metadata describes a label table but there is no '{LABEL_TABLE_KEY}' tensor")
        return
    names = list(cond.get("names", []))
    klass = cond.get("class_label")
    columns = names + ([klass["name"]] if klass else [])
    if not isinstance(described, dict) or described.get("columns") != columns:
        fail(f"tensor '{LABEL_TABLE_KEY}' needs metadata conditions.table.columns = {columns}")
    if table.ndim != 2 or table.shape[1] != len(columns) or len(table) < 1:
        fail(f"tensor '{LABEL_TABLE_KEY}' has shape {tuple(table.shape)}; expected "
             f"(rows >= 1, {len(columns)}) for labels {columns}")
    if not np.all(np.isfinite(table)):
        fail(f"tensor '{LABEL_TABLE_KEY}' holds NaN or infinite values")
    for c, k in enumerate(names):
        lo, hi = cond["min"][c], cond["max"][c]
        slack = 1e-6 * max(1.0, abs(lo), abs(hi))
        if table[:, c].min() < lo - slack or table[:, c].max() > hi + slack:
            fail(f"label table column {k!r} leaves the training range [{lo:g}, {hi:g}]")
    if klass:
        col = table[:, -1]
        if not np.all((col == np.round(col)) & (col >= 0) & (col < len(klass["class_names"]))):
            fail(f"label table column {klass['name']!r} must hold class numbers 0 to "
                 f"{len(klass['class_names']) - 1}")


def fit_psf(psf, size, what="psf"):
    """PSF images [..., ny, nx] of any size on the model's [..., size, size] grid: padded with
    zeros or cropped about the centre, GalSim's convention (the centre pixel of an n-pixel side
    is pixel n // 2, as ``drawImage(nx=n, ny=n, use_true_center=False)`` puts it), so that the
    centre pixel lands on pixel (size // 2, size // 2). Cropping away more than `PSF_LOST_FLUX`
    of a PSF's flux warns.

    Parameters:
        psf:    Array [..., ny, nx] (one PSF or a stack), any ny, nx >= 1.
        size:   The side of the model's stamps.
        what:   How the PSF is named in the warning. [default: "psf"]

    Returns:
        float32 array [..., size, size].
    """
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim < 2 or min(psf.shape[-2:]) < 1:
        raise VQVAEInputError(f"{what} must be an image [ny, nx] or a stack of them, got shape "
                              f"{psf.shape}")
    out = np.zeros(psf.shape[:-2] + (size, size))
    src, dst = [], []
    for n in psf.shape[-2:]:
        shift = size // 2 - n // 2  # source pixel i lands on pixel i + shift
        lo, hi = max(0, -shift), min(n, size - shift)
        src.append(slice(lo, hi))
        dst.append(slice(lo + shift, hi + shift))
    out[(Ellipsis, *dst)] = psf[(Ellipsis, *src)]
    total = psf.sum(axis=(-2, -1))
    lost = np.abs(total - out.sum(axis=(-2, -1))) / np.maximum(np.abs(total), 1e-300)
    if np.any(lost > PSF_LOST_FLUX):
        warnings.warn(f"{what}: the {psf.shape[-1]}x{psf.shape[-2]}-pixel PSF is cropped to the "
                      f"model's {size}x{size} stamp, losing {lost.max():.2%} of its flux",
                      stacklevel=2)
    return out.astype(np.float32)


def psf_fwhm(psf_image, pixel_scale):
    """Gaussian-equivalent FWHM in arcsec of a PSF image: 2.355 times its HSM adaptive-moments
    sigma. (GalSim's ``calculateFWHM`` is unreliable on diffraction PSFs with struts.)"""
    import galsim

    image = galsim.Image(np.asarray(psf_image, dtype=np.float64), scale=pixel_scale)
    sigma = galsim.hsm.FindAdaptiveMom(image).moments_sigma
    return float(2.0 * np.sqrt(2.0 * np.log(2.0)) * sigma * pixel_scale)

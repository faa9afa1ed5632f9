"""GalSim config types: the input ``vqvae_model`` and the object ``VQVAEGalaxy``.

A config uses them with ``modules: [galsim_vqvae]``::

    input:
        vqvae_model: {file_name: default, device: cpu}   # batch_size: 32 (512 on cuda)
    gal:
        type: VQVAEGalaxy
        conditions: {mag: {type: Catalog, col: mag}}
        flux: 1000.

``conditions`` gives any subset of the model's labels (none at all: galaxies of the training
population); the others are drawn from the labels stored in the model, given these, from each
galaxy's seed (`galsim_vqvae.Emulator.draw_conditions`), and ``$(@gal).conditions['hlr']`` reads
them back, e.g. for a truth catalog.

Reproducibility. Each galaxy's sampling seed comes from its own per-object rng
(`galsim.config.GetRNG`), or from ``index`` if given, so the same ``random_seed`` gives the same
galaxies whatever ``image.nproc``, ``output.nproc`` or ``galsim -n/-j`` split runs them.

Batching. The network is not called once per galaxy. The objects of each image are split into
fixed blocks of ``batch_size`` consecutive object numbers; when a galaxy of a block is first
needed, the requests (seed and conditions) of the whole block are found by running GalSim's own
stamp setup for each of its objects up to the galaxy (a dry run on a copy of the config) and
the block is generated in one network call. A block's composition depends on the object numbers
only, so even the floating-point results do not depend on how the work is split between
processes. With ``image.nproc`` > 1 the worker processes share the blocks through one `_Board`
served by a manager process: each block is generated once, by the first worker that needs it,
while the others generate later blocks. Galaxies that are not found in their block (e.g. one
rebuilt after ``stamp.reject``) are generated alone. In the dry run the builder records its
request and raises GalSim's own `SkipThisObject`, so the rest of the stamp is skipped.

The torch model is loaded lazily, once per process, on first use: after GalSim has forked its
worker processes, so CUDA is initialised in the workers that use it.
"""

import difflib
import multiprocessing
import os
import re
import threading
from multiprocessing.managers import BaseManager

import galsim
import numpy as np
from galsim.config import (ExtraOutputBuilder, GetAllParams, GetInputObj, GetRNG, InputLoader,
                           ParseValue, RegisterExtraOutput, RegisterInputType, RegisterObjectType,
                           SkipThisObject)
from galsim.config.value import standard_ignore
from galsim.errors import GalSimConfigError, GalSimConfigValueError, GalSimValueError

from .profile import (RESOLUTION_POLICIES, VQVAEGalaxy, _model_info, _target_fwhm, check_psf,
                      draw_labels, generate, get_emulator, index_seed, rng_seed)
from .provenance import provenance_cards

__all__ = ["VQVAEModel", "VQVAEModelLoader", "BuildVQVAEGalaxy"]

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


CPU_BATCH_SIZE = 32   # galaxies per network call on the CPU (the C++ sampler splits them)
GPU_BATCH_SIZE = 512  # on a GPU: a block fills the device (benchmarks/README.md)


class VQVAEModel:
    """The ``vqvae_model`` input: a handle on a galaxy model, loaded on first use in each process.

    Parameters:
        file_name:          ``"default"`` for the shipped model, or the path of a saved model.
                            [default: "default"]
        device:             Torch device for the networks: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
                            ``"cuda"`` on a machine with several GPUs spreads GalSim's worker
                            processes over them (worker k on GPU (k - 1) mod n); ``"cuda:N"``
                            pins every process to GPU N. [default: "cpu"]
        batch_size:         Galaxies generated per network call (a block of consecutive object
                            numbers). It never changes the galaxies, only how they are batched.
                            [default: None, i.e. 512 on a GPU (blocks that keep it busy) and 32
                            on the CPU]
        resolution_policy:  What to do when a galaxy is drawn through a PSF narrower than the
                            training PSF: ``"warn"``, ``"raise"`` or ``"ignore"``.
                            [default: "warn"]
        out_of_range:       A condition outside the model's training range: ``"error"`` stops
                            the build (naming the label, value and range), ``"clip"`` clips it
                            to the range (e.g. for catalog columns that overrun the training
                            set; the truth catalog then records the value asked for).
                            [default: "error"]
        num_threads:        Torch CPU threads per process; 0 leaves torch's own default. One
                            thread per process is the GalSim way (parallelise with ``nproc``)
                            and avoids oversubscribed, spinning torch threads, which can make
                            sampling many times slower on a busy machine. [default: 1]
    """

    _req_params = {}
    _opt_params = {"file_name": str, "device": str, "batch_size": int,
                   "resolution_policy": str, "out_of_range": str, "num_threads": int}
    _single_params = []
    _takes_rng = False

    def __init__(self, file_name="default", device="cpu", batch_size=None,
                 resolution_policy="warn", out_of_range="error", num_threads=1):
        if not isinstance(file_name, (str, os.PathLike)):
            raise GalSimConfigValueError("vqvae_model.file_name must be 'default' or the path of "
                                         "a model file", file_name)
        if file_name != "default" and not os.path.exists(file_name):
            raise GalSimConfigValueError("vqvae_model.file_name: no such model file",
                                         file_name)
        if not _DEVICE_RE.match(str(device)):
            raise GalSimConfigValueError("vqvae_model.device must be cpu, cuda, cuda:N or mps",
                                         device)
        if batch_size is None:
            batch_size = GPU_BATCH_SIZE if str(device).startswith("cuda") else CPU_BATCH_SIZE
        for name, value, low, high in (("batch_size", batch_size, 1, 2 ** 20),
                                       ("num_threads", num_threads, 0, 4096)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not low <= value <= high:
                raise GalSimConfigValueError(f"vqvae_model.{name} must be an integer from {low} "
                                             f"to {high}", value)
        if resolution_policy not in RESOLUTION_POLICIES:
            raise GalSimConfigValueError("vqvae_model.resolution_policy is invalid",
                                         resolution_policy, RESOLUTION_POLICIES)
        if out_of_range not in ("error", "clip"):
            raise GalSimConfigValueError("vqvae_model.out_of_range is invalid", out_of_range,
                                         ("error", "clip"))
        self.file_name = file_name
        self.device = device
        self.batch_size = int(batch_size)
        self.resolution_policy = resolution_policy
        self.out_of_range = out_of_range
        self.num_threads = int(num_threads)
        self._reset()

    def _reset(self):
        self._image = None       # (first object number, number of objects) of the image
        self._board = None       # the image's blocks (a `_Board`, or a proxy of one if shared)
        self._manager = None     # the process serving the shared boards, started when needed
        self._last_psf = {}      # the last PSF checked and its pixel scale
        self._warned = set()     # target FWHMs warned about
        self.calls = 0           # network calls made in this process (for tests and logs)

    def __getstate__(self):
        d = self.__dict__.copy()
        d.update(_image=None, _board=None, _manager=None, _last_psf={}, _warned=set())
        return d

    @property
    def emulator(self):
        """The `Emulator`, loaded on first use in this process."""
        if self.__dict__.get("_threads_pid") != os.getpid():
            self._threads_pid = os.getpid()
            if self.num_threads:
                import torch

                torch.set_num_threads(self.num_threads)
        device = self.device
        if str(device).startswith("cuda"):
            import torch

            if torch.cuda._is_in_bad_fork():
                raise GalSimConfigError(
                    f"vqvae_model.device: {device!r} in a GalSim worker process, but CUDA was "
                    "already initialised in the process that forked it (GalSim's nproc > 1 "
                    "forks, and a forked child cannot use CUDA then). Run this config in a fresh "
                    "process (e.g. `galsim config.yaml`) without using the GPU before it, or use "
                    "nproc: 1 or device: cpu")
            if device == "cuda":
                device = _worker_device(device, multiprocessing.current_process().name,
                                        torch.cuda.device_count())
        return get_emulator(self.file_name, device)

    @property
    def info(self):
        return _model_info(self.emulator)

    @property
    def path(self):
        """The path of the model bundle."""
        from .emulator import _DEFAULT_PATH

        return _DEFAULT_PATH if self.file_name == "default" else os.fspath(self.file_name)

    # --------------------------------------------------------------------------------------------
    def newImage(self, first_obj_num, nobjects, shared=False):
        """Start an image of ``nobjects`` objects numbered from ``first_obj_num``; ``shared``:
        its stamps will be built by several processes, which then share the generated blocks."""
        first, nobj, size = int(first_obj_num), int(nobjects), self.batch_size
        blocks = [(s, min(s + size, first + nobj)) for s in range(first, first + nobj, size)]
        if shared:
            if self._manager is None:
                self._manager = _BoardManager()
                self._manager.start()
            self._board = self._manager.Board(blocks)
        else:
            self._board = _Board(blocks)
        self._image = (first, nobj)

    def image_for(self, request, base, logger):
        """The generated image for ``request`` (a `_Request`) of object ``base['obj_num']``: taken
        from its block, which this process generates if no other process has (or is doing so);
        while another process generates it, this one generates a later block."""
        obj_num = base.get("obj_num", 0)
        block = self._block_of(obj_num)
        while block is not None:
            action, arg = self._board.next(block, request.key)
            if action == "take":
                if arg is not None:
                    return arg
                break  # not in its block (e.g. rebuilt after stamp.reject)
            own = arg == block
            self._make_block(arg, base, obj_num if own else None, request if own else None,
                             logger)
        logger.debug("obj %d: VQVAEGalaxy generated alone (not found in its block)", obj_num)
        return self._generate([request], logger, "object %d" % obj_num)[0][1]

    def _block_of(self, obj_num):
        if self._image is None:
            return None
        first, nobj = self._image
        if not first <= obj_num < first + nobj:
            return None
        start = first + (obj_num - first) // self.batch_size * self.batch_size
        return (start, min(start + self.batch_size, first + nobj))

    def _make_block(self, block, base, obj_num, request, logger):
        """Generate ``block`` (claimed on the board) and publish it there."""
        try:
            requests = _collect_block(base, range(*block), obj_num, request, logger)
            done = self._generate(requests, logger,
                                  "objects %d..%d" % (block[0], block[1] - 1))
        except BaseException:
            self._board.release(block)  # unclaimed again: the next process to need it makes it
            raise
        self._board.publish(block, {r.key: image for r, image in done})

    def _generate(self, requests, logger, what):
        unique = list({r.key: r for r in requests}.values())
        conditional = unique[0].conditions is not None
        images = generate(self.emulator, [r.seed for r in unique],
                          [r.conditions for r in unique] if conditional else None)
        self.calls += 1
        logger.info("VQVAEGalaxy: generated %d galaxies in one batch (%s)", len(unique), what)
        return list(zip(unique, images))

    def check_psf(self, psf, pixel_scale, logger):
        """Apply the resolution rule to the stamp's PSF; warn (and log) once per distinct
        target FWHM in this process."""
        if self.resolution_policy == "ignore":
            return
        last = self._last_psf
        if last.get("psf") is psf and last.get("scale") == pixel_scale:
            return  # the same (safe, reused) PSF object as the previous stamp
        fwhm = _target_fwhm(psf, pixel_scale)
        if fwhm < self.info.psf_fwhm and round(fwhm, 4) not in self._warned:
            # raises under "raise"; under "warn", warns once per distinct FWHM
            check_psf(self.info.psf_fwhm, psf, pixel_scale, self.resolution_policy)
            self._warned.add(round(fwhm, 4))
            logger.warning("VQVAEGalaxy: a PSF of FWHM %.4g\" (pixel included) is narrower than "
                           "the model's training PSF (FWHM %.4g\")", fwhm, self.info.psf_fwhm)
        self._last_psf = {"psf": psf, "scale": pixel_scale}


def _worker_device(device, process_name, n_gpus):
    """The GPU of GalSim worker process ``Process-k`` for ``device="cuda"``: ``cuda:(k-1) % n``
    with n GPUs (the main process, or a single GPU: plain ``cuda``)."""
    match = re.fullmatch(r"Process-(\d+)", process_name)
    if not match:
        return device
    from .devices import worker_device

    return worker_device(device, int(match.group(1)) - 1, n_gpus)


class VQVAEModelLoader(InputLoader):
    """Loads `VQVAEModel` without a proxy (each process holds its own handle) and tells it where
    each image's objects start, for the fixed batching blocks."""

    def __init__(self):
        super().__init__(VQVAEModel, use_proxy=False)

    def getKwargs(self, config, base, logger):
        """`InputLoader.getKwargs`, with a mistyped field or a bad value named (and a field
        suggested)."""
        check_fields(config, "vqvae_model", VQVAEModel._opt_params)
        return _get_all_params(config, base, "vqvae_model", VQVAEModel._opt_params)

    def setupImage(self, input_obj, config, base, logger):
        image_num = base.get("image_num", 0)
        nobj = galsim.config.GetNObjForImage(base, image_num, logger=logger)
        nproc = 1
        if "nproc" in base.get("image", {}) and "current_nproc" not in base:
            nproc = ParseValue(base["image"], "nproc", base, int)[0]
        input_obj.newImage(base.get("obj_num", 0), nobj, shared=nproc != 1 and nobj > 1)


class _Board:
    """The generated blocks of one image, and which are being generated.

    With ``image.nproc`` > 1 one board serves all the worker processes (through `_BoardManager`:
    its methods run in one server process, a thread per worker, so a worker waiting for a block
    waits on a condition, not by polling). GalSim hands the workers stamps one at a time, so
    every worker meets every block: the first to need a block claims and generates it, and a
    worker that needs a block being generated by another generates the next unclaimed block
    meanwhile. Each block is generated once, by one process, with its fixed composition; each
    galaxy's image is handed out once and then dropped.
    """

    def __init__(self, blocks):
        self._blocks = blocks            # the image's blocks, in order
        self._claimed = set()            # blocks claimed for generation
        self._images = {}                # block -> {request key: image} not yet handed out
        self._cond = threading.Condition()

    def next(self, block, key):
        """What to do for the galaxy ``key`` of ``block``: ``("take", image)`` (``image`` None
        if the block does not hold that galaxy) or ``("make", b)``: generate block ``b`` (now
        claimed), then ask again."""
        with self._cond:
            while True:
                if block in self._images:
                    return "take", self._images[block].pop(key, None)
                if block not in self._claimed:
                    self._claimed.add(block)
                    return "make", block
                for other in self._blocks[self._blocks.index(block) + 1:]:
                    if other not in self._claimed:
                        self._claimed.add(other)
                        return "make", other
                self._cond.wait()

    def publish(self, block, images):
        with self._cond:
            self._images[block] = images
            self._cond.notify_all()

    def release(self, block):
        """Unclaim ``block`` after its generation failed."""
        with self._cond:
            self._claimed.discard(block)
            self._cond.notify_all()


class _BoardManager(BaseManager):
    """The server process of the shared `_Board` s (forked, as GalSim's own managers are)."""

    def __init__(self):
        super().__init__(ctx=multiprocessing.get_context("fork"))


_BoardManager.register("Board", _Board)


# ------------------------------------------------------------------------------------------------
class _Request:
    """What the network needs for one galaxy: its seed and conditions."""

    __slots__ = ("seed", "conditions", "key")

    def __init__(self, seed, conditions):
        self.seed = seed
        self.conditions = conditions
        cond = None if conditions is None else tuple(sorted(conditions.items()))
        self.key = (seed, cond)


_IGNORE = ["conditions"]


def check_fields(config, where, fields, also=()):
    """Refuse a field of a config block that is not one of ``fields`` (nor of ``also``, e.g.
    GalSim's common object fields), naming the block and suggesting the field meant: GalSim's own
    check says only "Unexpected attribute conditons found"."""
    allowed = set(fields) | set(also) | set(standard_ignore)
    for key in config:
        if key in allowed or str(key).startswith("_"):
            continue
        close = difflib.get_close_matches(str(key), sorted(set(fields) | set(also)), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GalSimConfigError(f"{where}: unknown field {key!r}{hint}; its fields are "
                                f"{sorted(fields)}")


def _get_all_params(config, base, where, opt, ignore=()):
    """`galsim.config.GetAllParams`, with a value that cannot be parsed named by its field (GalSim
    itself raises a bare KeyError or IndexError for some, e.g. ``''`` or ``'@gal.nothing'``)."""
    try:
        return GetAllParams(config, base, opt=opt, ignore=list(ignore))
    except Exception as err:  # noqa: BLE001 - re-raised, as GalSim's error naming the field
        for key, value_type in opt.items():
            if key in config:
                _parse_value(config, key, base, value_type, f"{where}.{key}")
        if isinstance(err, galsim.GalSimError):
            raise
        raise GalSimConfigError(f"{where}: {type(err).__name__}: {err}") from None


def _parse_value(config, key, base, value_type, where):
    """`galsim.config.ParseValue`; any failure is a GalSimConfigError naming ``where``."""
    try:
        return ParseValue(config, key, base, value_type)[0]
    except Exception as err:  # noqa: BLE001 - GalSim's errors and its bare KeyError/IndexError
        text = str(err) if isinstance(err, galsim.GalSimError) else \
            f"cannot evaluate {config[key]!r} as a {value_type.__name__} " \
            f"({type(err).__name__}: {err})"
        raise GalSimConfigError(f"{where}: {text}") from None


def _parse(config, base, model, ignore, logger):
    """Parse a VQVAEGalaxy config dict into (request, kwargs for the galaxy)."""
    check_fields(config, "VQVAEGalaxy", list(VQVAEGalaxy._opt_params) + _IGNORE, ignore)
    empty = sorted(k for k in VQVAEGalaxy._opt_params if k in config and config[k] is None)
    if empty:  # GalSim itself would fail on them with a TypeError
        raise GalSimConfigError(f"VQVAEGalaxy: field(s) {empty} have no value (null)")
    info = model.info
    given = None
    if "conditions" in config:
        cond = config["conditions"]
        if not isinstance(cond, dict):
            raise GalSimConfigError("VQVAEGalaxy.conditions must be a dict label: value, got "
                                    f"{cond!r}")
        # labels the model lacks go to draw_labels unparsed, which names them
        given = {k: _parse_value(cond, k, base, str if k == model.emulator.class_label else float,
                                 f"VQVAEGalaxy.conditions.{k}") if k in info.label_names
                 else cond[k] for k in cond}
    # After the conditions, so that e.g. flux: '$f(@gal.conditions.mag)' finds them evaluated.
    kwargs, _ = _get_all_params(config, base, "VQVAEGalaxy", VQVAEGalaxy._opt_params,
                                ignore + _IGNORE)
    index = kwargs.pop("index", None)
    if index is not None:
        seed = index_seed(index)
    else:
        rng = GetRNG(config, base, logger, "VQVAEGalaxy")
        if rng is None:  # pragma: no cover  (GalSim always sets one up)
            raise GalSimConfigError("VQVAEGalaxy needs an rng or an index")
        seed = rng_seed(rng)
    try:
        conditions = draw_labels(model.emulator, given, [seed], model.out_of_range)
    except GalSimValueError as err:  # not a range error: a field of this config
        raise GalSimConfigError(f"VQVAEGalaxy.conditions: {err}") from None
    conditions = None if conditions is None else conditions[0]
    kwargs.update(index=index, seed=seed, conditions=conditions)
    return _Request(seed, conditions), kwargs


def _collect_block(base, obj_nums, own_obj_num, own_request, logger):
    """The requests of the objects ``obj_nums``, found by dry runs of their stamps."""
    requests = []
    for obj_num in obj_nums:
        if obj_num == own_obj_num:
            requests.append(own_request)
            continue
        cfg = galsim.config.CopyConfig(base)
        cfg["extra_builder"] = {}
        found = cfg["_vqvae_collect"] = []
        try:  # the builder records the request and skips the rest of the stamp
            galsim.config.BuildStamp(cfg, obj_num=obj_num, do_noise=False, logger=None)
        except Exception as err:  # the real run will report it, with GalSim's context
            logger.debug("obj %d: dry run for batching failed: %s", obj_num, err)
        if found:
            requests.append(found[0])
    return requests


def BuildVQVAEGalaxy(config, base, ignore, gsparams, logger):
    """The builder of the ``VQVAEGalaxy`` config type (see `galsim.config.RegisterObjectType`)."""
    model = GetInputObj("vqvae_model", config, base, "VQVAEGalaxy")
    request, kwargs = _parse(config, base, model, ignore, logger)
    collect = base.get("_vqvae_collect")
    if collect is not None:
        collect.append(request)
        raise SkipThisObject("VQVAEGalaxy: dry run for batching")
    image = model.image_for(request, base, logger)
    if gsparams:
        kwargs["gsparams"] = galsim.GSParams(**gsparams)
    gal = VQVAEGalaxy._from_generated(image, model.info, **kwargs)
    psf = _current_psf(base)
    if psf is not None:
        model.check_psf(psf, base.get("pixel_scale"), logger)
    return gal, False


def _current_psf(base):
    """The PSF GalSim built for the current stamp, if any."""
    current = base.get("psf", {}).get("current") if isinstance(base.get("psf"), dict) else None
    if current and isinstance(current[0], galsim.GSObject):
        return current[0]
    return None


class ProvenanceBuilder(ExtraOutputBuilder):
    """The extra output ``output.vqvae_provenance: {}``: it writes no file of its own but records
    in each image's FITS header the model (MODEL: its name, MODELSHA: the sha256 of the bundle),
    the package version (VQVAEVER) and the seed of the image's random numbers (SEED, GalSim's
    per-image seed from ``image.random_seed``)."""

    def processImage(self, index, obj_nums, config, base, logger):
        image = base.get("current_image")
        if image is None:
            return
        model = GetInputObj("vqvae_model", config, base, "vqvae_provenance")
        header = getattr(image, "header", None) or galsim.FitsHeader()
        for key, card in provenance_cards(model.path).items():
            header[key] = card
        header["SEED"] = (int(base.get("image_num_seed", 0)), "GalSim seed of this image")
        image.header = header


RegisterInputType("vqvae_model", VQVAEModelLoader())
RegisterExtraOutput("vqvae_provenance", ProvenanceBuilder())
RegisterObjectType("VQVAEGalaxy", BuildVQVAEGalaxy, input_type="vqvae_model")

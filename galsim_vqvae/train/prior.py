"""Training the Gated PixelCNN prior on the code maps of a trained VQ-VAE.

The dataset is encoded once into ``out/codes.npz`` (reused while the dataset and the VQ-VAE
checkpoint it came from are unchanged), the conditioning labels are read from the dataset's
``params`` group and normalised with the training split's mean and standard deviation, and the
prior is fit by cross-entropy. The held-out split (stamp i with ``i % 10 == 9``) gives the negative
log-likelihood in bits per code at each log and at the end.

Runs resume exactly: the batch of step s is a function of (seed, epoch, s) alone, the learning
rate a function of s alone, and the model and optimizer state are in the checkpoint, so N steps
straight and N/2 + N/2 resumed give the same weights on the CPU. Nothing depends on the total
number of steps, so a run can also be extended. The shipped weights are an exponential moving
average of the optimizer's weights (`ema_decay`), which plays the part of a learning-rate decay.

With ``class_label`` the prior is also conditioned on an integer class (e.g. ``morph_class``)
through `GatedPixelCNN`'s class embedding; the dataset names the classes in its ``class_names``
attribute, and the checkpoint's ``classes`` entry records the label and the names.
"""

import contextlib
import hashlib
import inspect
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..errors import VQVAEFormatError, VQVAEInputError
from ..fileio import atomic_path
from ..nn.pixelcnn import GatedPixelCNN
from . import distributed
from .checkpoint import CHECKPOINT_NAME, RunLock, load_checkpoint, save_checkpoint

CODES_NAME = "codes.npz"
LOG_NAME = "log.jsonl"
DEFAULT_MODEL = dict(channels=128, layers=15, kernel_size=5)
WARMUP_STEPS = 100
EMA_DECAY = 0.999
# Training settings added later, with the value that older checkpoints were trained with
SETTING_DEFAULTS = {"ema": EMA_DECAY, "class_label": None}
CONFIG_DEFAULTS = {"dropout": 0.0}
_LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Schedule
def learning_rate(step, lr):
    """The learning rate of step ``step``: linear warm-up over `WARMUP_STEPS`, then constant.

    It depends on the step alone (not on the run length), so resumed runs follow it exactly.
    """
    return lr * min(1.0, (step + 1) / WARMUP_STEPS)


def ema_decay(step, decay=EMA_DECAY):
    """Decay of the weights' moving average after step ``step``: ``min(decay,
    (1 + step) / (10 + step))``, so early averages are not dominated by the initial weights
    (``decay`` 0: the average is the optimizer's weights)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def dropout_seed(seed, step, rank=0):
    """Seed of the dropout masks of step ``step`` on rank ``rank``: a function of these alone, so
    a resumed run draws the masks of an uninterrupted one."""
    words = np.random.SeedSequence([int(seed), int(step), int(rank), 0xD80]).generate_state(
        1, dtype=np.uint64)
    return int(words[0]) >> 1


def epoch_permutation(seed, epoch, n):
    """The order [n] in which epoch ``epoch`` visits the training split: a function of
    (seed, epoch) alone. Its first ``n // batch_size`` whole batches are used in turn."""
    words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)
    gen = torch.Generator().manual_seed(int(words[0]) >> 1)
    return torch.randperm(n, generator=gen)


# ------------------------------------------------------------------------------------------------
# Inputs: code maps (cached) and labels
def _sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _dataset_fingerprint(data, header, n):
    """Identity of a dataset file by content: header, size, and a hash of 64 spread stamps."""
    from ..data.dataset import load_arrays

    idx = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(np.int64))
    observed = load_arrays(data, indices=idx, keys=("observed",))["observed"]
    digest = hashlib.sha256(np.ascontiguousarray(observed, dtype=np.float32).tobytes())
    keys = ("pixel_scale", "stamp_size", "band", "zeropoint", "source", "description", "seed")
    return {"n": int(n), "header": {k: _jsonable(header.get(k)) for k in keys},
            "observed_sha256": digest.hexdigest()}


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def encode_dataset(data, vqvae, device="cpu", batch_size=512, progress=True):
    """Encode every ``observed`` stamp of a dataset file into code maps [N, h, w] (numpy int64).

    Parameters:
        data:       Path of the dataset file.
        vqvae:      A `galsim_vqvae.nn.vqvae.VQVAE` (moved to ``device`` and put in eval mode).
        device:     Torch device to encode on. [default: "cpu"]
        batch_size: Stamps per encoder call. [default: 512]
        progress:   Show a progress bar. [default: True]
    """
    from ..data.dataset import load_arrays, read_header

    n = read_header(data)["n"]
    vqvae = vqvae.to(device).eval()
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="encoding stamps",
                          unit="batch"):
            idx = np.arange(start, min(n, start + batch_size))
            obs = load_arrays(data, indices=idx, keys=("observed",))["observed"]
            x = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))[:, None].to(device)
            out.append(vqvae.encode_codes(x).cpu().numpy().astype(np.int64))
    return np.concatenate(out) if out else np.zeros((0, 0, 0), np.int64)


def cached_codes(data, vqvae_checkpoint, out, device="cpu", progress=True):
    """The dataset's code maps under the VQ-VAE, from ``out/codes.npz`` or freshly encoded.

    The cache records the dataset's and the checkpoint's fingerprints; a cache that does not
    match them is re-encoded (and replaced atomically).

    Returns:
        (codes [N, h, w] int64 numpy array, num_codes, fingerprint dict)
    """
    from ..data.dataset import read_header
    from ..nn.vqvae import VQVAE

    header = read_header(data)
    n = header["n"]
    fingerprint = {"dataset": _dataset_fingerprint(data, header, n),
                   "vqvae_sha256": _sha256_file(vqvae_checkpoint)}
    path = os.path.join(out, CODES_NAME)
    if os.path.exists(path):
        try:
            with np.load(path) as cache:
                stored = json.loads(str(cache["fingerprint"]))
                if stored == fingerprint:
                    return cache["codes"].astype(np.int64), int(cache["num_codes"]), fingerprint
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: encode again
        if progress:
            tqdm.write(f"{path} was made from another dataset or VQ-VAE; encoding again")
    state = load_checkpoint(vqvae_checkpoint)
    try:
        vqvae = VQVAE.from_config(state["config"])
        vqvae.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise VQVAEFormatError(f"{vqvae_checkpoint} is not a VQ-VAE checkpoint: {err}") from None
    codes = encode_dataset(data, vqvae, device=device, progress=progress)
    num_codes = int(vqvae.config["num_codes"])
    dtype = np.int16 if num_codes <= np.iinfo(np.int16).max + 1 else np.int32
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes.astype(dtype), num_codes=num_codes,
                     fingerprint=json.dumps(fingerprint, sort_keys=True))
    return codes, num_codes, fingerprint


def _check_grid(data, header, vqvae_checkpoint):
    """The dataset's stamps must be on the grid (stamp size, pixel scale) that the VQ-VAE was
    trained on: its codes mean nothing on another."""
    trained = load_checkpoint(vqvae_checkpoint).get("data") or {}
    if "stamp_size" not in trained or "pixel_scale" not in trained:
        return
    mine = (int(header["stamp_size"]), float(header["pixel_scale"]))
    theirs = (int(trained["stamp_size"]), float(trained["pixel_scale"]))
    if mine[0] != theirs[0] or abs(mine[1] - theirs[1]) > 1e-3 * theirs[1]:
        raise VQVAEInputError(
            f"{data} holds {mine[0]}x{mine[0]} stamps at {mine[1]:g}\"/pixel but the VQ-VAE "
            f"{vqvae_checkpoint} was trained on {theirs[0]}x{theirs[0]} stamps at "
            f"{theirs[1]:g}\"/pixel; train the prior on data on the VQ-VAE's grid")


def read_labels(data, names):
    """Conditioning labels [N, len(names)] float64 from the dataset's ``params`` group."""
    from ..data.dataset import load_arrays, read_header

    names = list(names)
    header = read_header(data)
    missing = [k for k in names if k not in header["params"]]
    if missing:
        raise VQVAEInputError(f"{data}: conditioning label(s) {missing} not in the dataset's "
                              f"'params' group; available: {header['params']}")
    if not names:
        return np.zeros((header["n"], 0))
    arrays = load_arrays(data, keys=[f"params/{k}" for k in names])
    columns = [np.asarray(arrays[f"params/{k}"], dtype=np.float64) for k in names]
    for k, col in zip(names, columns):
        bad = np.flatnonzero(~np.isfinite(col))
        if bad.size:
            raise VQVAEInputError(f"{data}: params/{k} is not finite at stamp {bad[0]} "
                                  f"({bad.size} stamps)")
    return np.stack(columns, axis=1)


def _class_names(header, data):
    """The dataset's ``class_names`` attribute as a list of distinct strings."""
    names = header.get("class_names")
    if isinstance(names, str):
        try:
            names = json.loads(names)
        except ValueError:
            names = None
    elif isinstance(names, np.ndarray):
        names = [_jsonable(v) for v in names.tolist()]
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(c, str) for c in names)
            and len(set(names)) == len(names)):
        raise VQVAEInputError(f"{data}: a class label needs the dataset attribute class_names, a "
                              f"list of distinct class names; found {names!r:.80}")
    return list(names)


def read_classes(data, name):
    """The integer class label ``params/name`` of every stamp and the names of the classes.

    Parameters:
        data:   Path of the dataset file.
        name:   Name of the label in the dataset's ``params`` group, e.g. ``"morph_class"``; its
                values (float32 holding ints) index the file's ``class_names`` attribute.

    Returns:
        (labels [N] int64 numpy array, list of class names)
    """
    from ..data.dataset import load_arrays, read_header

    header = read_header(data)
    if name not in header["params"]:
        raise VQVAEInputError(f"{data}: class label {name!r} not in the dataset's 'params' group; "
                              f"available: {header['params']}")
    names = _class_names(header, data)
    values = np.asarray(load_arrays(data, keys=[f"params/{name}"])[f"params/{name}"], np.float64)
    bad = np.flatnonzero(~(np.isfinite(values) & (values == np.round(values)) & (values >= 0)
                           & (values < len(names))))
    if bad.size:
        raise VQVAEInputError(f"{data}: params/{name} must hold class indices 0..{len(names) - 1} "
                              f"(class_names {names}); stamp {bad[0]} has "
                              f"{float(values[bad[0]])!r} ({bad.size} stamps)")
    return values.astype(np.int64), names


def label_table(data, names, max_rows=20_000, seed=0):
    """The labels ``names`` of the dataset's training split, [m, len(names)] float32, for a
    model bundle (`galsim_vqvae.Emulator.label_table`): every training row, or a seeded random
    subsample of ``max_rows`` of them (in dataset order) if there are more."""
    from ..data.dataset import split_indices

    labels = read_labels(data, names)
    rows = split_indices(len(labels), "train")
    if rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    return labels[rows].astype(np.float32)


def label_normalisation(train_labels, names):
    """{"names", "mean", "std", "min", "max"} (lists of floats) of the training labels."""
    mean = train_labels.mean(0)
    std = train_labels.std(0)
    for k, s in zip(names, std):
        if not s > 0:
            raise VQVAEInputError(f"conditioning label {k!r} is constant on the training split; "
                                  "it cannot condition the prior (leave it out of conditions)")
    return {"names": list(names), "mean": mean.tolist(), "std": std.tolist(),
            "min": train_labels.min(0).tolist(), "max": train_labels.max(0).tolist()}


# ------------------------------------------------------------------------------------------------
# Training
def _check_positive_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise VQVAEInputError(f"train_prior: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _evaluate(prior, codes, cond, classes, index, batch_size, use_amp):
    """Mean negative log-likelihood (nats per code) of the maps ``codes[index]``, as a tensor;
    ``cond`` [N, C] and ``classes`` [N] are the maps' labels (each None if not used)."""
    was_training = prior.training
    prior.eval()
    total = torch.zeros((), dtype=torch.float64, device=codes.device)
    with torch.no_grad():
        for start in range(0, index.numel(), batch_size):
            idx = index[start:start + batch_size]
            x = codes[idx]
            with torch.autocast(device_type=codes.device.type, dtype=torch.bfloat16,
                                enabled=use_amp):
                logits = prior(x, cond[idx] if cond is not None else None,
                               classes[idx] if classes is not None else None)
            total += F.cross_entropy(logits.float(), x, reduction="sum").double()
    prior.train(was_training)
    return total / max(1, index.numel() * codes.shape[1] * codes.shape[2])


def _trim_log(path, step):
    """Drop log lines past ``step`` (written after the checkpoint a resumed run starts from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.writelines(keep)


def train_prior(data, vqvae_checkpoint, out, steps, batch_size=64, lr=3e-4, seed=0, device="cpu",
                conditions=("mag", "hlr"), model=None, log_every=50, checkpoint_every=500,
                resume=False, progress=True, ema=EMA_DECAY, class_label=None):
    """Train a `GatedPixelCNN` prior on the code maps of a dataset under a trained VQ-VAE.

    Writes ``out/checkpoint.pt`` (atomic; keys ``model``, ``config``, ``optimizer``, ``step``,
    ``seed``, ``history``, ``data``, ``conditions``, ``vqvae_checkpoint``, ``test_bits_per_code``,
    ``train``, ``codes_fingerprint``, ``model_raw``, ``classes``), ``out/codes.npz`` (the cached
    code maps) and
    ``out/log.jsonl`` (one JSON line per log). The directory is locked while the run lasts.
    ``model`` holds a moving average of the weights (decay `ema_decay`), the model to ship and the
    one whose held-out NLL is reported; ``model_raw`` holds the optimizer's current weights.

    Parameters:
        data:               Path of the dataset file (HDF5, `galsim_vqvae.data.dataset`).
        vqvae_checkpoint:   Path of the trained VQ-VAE's ``checkpoint.pt``.
        out:                Output directory (created if needed).
        steps:              Total number of optimizer steps (a resumed run continues to it).
        batch_size:         Code maps per step (at most the training split). [default: 64]
        lr:                 Adam learning rate after a 100-step linear warm-up. [default: 3e-4]
        seed:               Seed of the initial weights and of the batch schedule. [default: 0]
        device:             Torch device; on CUDA the step runs under bf16 autocast. [default: "cpu"]
        conditions:         Names of labels in the dataset's ``params`` group to condition on
                            (normalised with the training split's mean and std); () for an
                            unconditional prior. [default: ("mag", "hlr")]
        model:              `GatedPixelCNN` keyword arguments (channels, layers, kernel_size,
                            dropout); num_codes, cond_dim and num_classes follow the VQ-VAE, the
                            conditions and the class label. [default: None, i.e. channels=128,
                            layers=15, kernel_size=5, dropout=0]
        log_every:          Steps between logs (training and held-out bits per code). [default: 50]
        checkpoint_every:   Steps between checkpoints (one is always written at the end).
                            [default: 500]
        resume:             Continue from ``out/checkpoint.pt`` if it exists (it must come from
                            the same data, VQ-VAE, conditions, model, seed and batch size); without
                            it an existing checkpoint is an error. [default: False]
        progress:           Show progress bars. [default: True]
        ema:                Decay of the moving average of the weights (`ema_decay`), the model
                            that is evaluated on the held-out maps and shipped; 0 ships the
                            optimizer's weights. [default: 0.999]
        class_label:        Name of an integer label in the dataset's ``params`` group (e.g.
                            ``"morph_class"``) to condition on as a class, through the prior's
                            class embedding (``num_classes`` = the number of the dataset's
                            ``class_names``); None for none. [default: None]

    Returns:
        A summary dict: ``step``, ``train_bits_per_code``, ``test_bits_per_code``,
        ``checkpoint``, ``num_parameters``, ``elapsed_s``.
    """
    steps = _check_positive_int("steps", steps, 0)
    batch_size = _check_positive_int("batch_size", batch_size)
    log_every = _check_positive_int("log_every", log_every)
    checkpoint_every = _check_positive_int("checkpoint_every", checkpoint_every)
    seed = _check_positive_int("seed", seed, 0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise VQVAEInputError(f"train_prior: lr must be a finite number > 0, got {lr!r}")
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
        raise VQVAEInputError(f"train_prior: ema must be a decay in [0, 1), got {ema!r}")
    if isinstance(conditions, str):
        conditions = tuple(c for c in conditions.split(",") if c)
    conditions = tuple(conditions or ())
    if class_label is not None and (not isinstance(class_label, str) or not class_label):
        raise VQVAEInputError(f"train_prior: class_label must be a label name, got "
                              f"{class_label!r}")
    if class_label in conditions:
        raise VQVAEInputError(f"train_prior: {class_label!r} is the class label; do not also "
                              "list it in conditions")
    if len(set(conditions)) != len(conditions):
        raise VQVAEInputError(f"train_prior: conditions repeat a label: {list(conditions)}")
    model = dict(model or {})
    for key in ("num_codes", "cond_dim", "num_classes"):
        if key in model:
            raise VQVAEInputError(f"train_prior: model[{key!r}] is set from the VQ-VAE, the "
                                  "conditions and the class label; do not pass it")
    device = resolve_device(device)
    for path, what in ((data, "dataset"), (vqvae_checkpoint, "VQ-VAE checkpoint")):
        if not os.path.isfile(path):
            raise VQVAEInputError(f"train_prior: {what} not found: {path}")
    data, vqvae_checkpoint, out = (os.fspath(p) for p in (data, vqvae_checkpoint, out))
    ctx = distributed.setup(device)  # one process, or this rank of a torchrun job
    try:
        with ctx.main_context(lambda: RunLock(out)):  # locked by rank 0
            # rank 0 first: it encodes the codes cache that the other ranks then read
            state, inputs = ctx.main_first(lambda: (
                _existing_checkpoint(out, resume),
                prepare_inputs(data, vqvae_checkpoint, out, conditions, ctx.device,
                               progress and ctx.is_main, class_label)))
            summary = _fit(inputs, out, state, steps, batch_size, float(lr), seed, ctx.device,
                           conditions, model, log_every, checkpoint_every, progress, ctx,
                           float(ema))
            ctx.barrier()  # the ranks end together
            return summary
    finally:
        ctx.close()


def _existing_checkpoint(out, resume):
    path = os.path.join(out, CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    if not resume:
        raise VQVAEInputError(f"{path} exists; pass resume=True to continue that run, "
                              "or choose another output directory")
    return load_checkpoint(path)


def prepare_inputs(data, vqvae_checkpoint, out, conditions, device="cpu", progress=True,
                   class_label=None):
    """What the training loop needs from a dataset and a VQ-VAE checkpoint (see `train_prior`).

    Returns:
        dict: ``codes`` [N, h, w] int64, ``num_codes``, ``labels`` [N, C] float64,
        ``fingerprint`` (of the dataset and VQ-VAE), ``data`` (header dict with ``path`` and
        ``n``), ``vqvae_checkpoint`` (absolute path), ``classes`` (None, or a dict: ``label``,
        its name; ``names``, the class names; ``values`` [N] int64, each stamp's class).
    """
    from ..data.dataset import read_header

    header = dict(read_header(data))
    labels = read_labels(data, conditions)  # before encoding: a bad label fails at once
    classes = None
    if class_label is not None:
        values, names = read_classes(data, class_label)
        classes = {"label": class_label, "names": names, "values": values}
    _check_grid(data, header, vqvae_checkpoint)
    codes, num_codes, fingerprint = cached_codes(data, vqvae_checkpoint, out, device, progress)
    info = {k: _jsonable(header.get(k)) for k in
            ("pixel_scale", "stamp_size", "band", "zeropoint", "flux_convention", "source",
             "description", "seed")}
    info.update(path=os.path.abspath(data), n=int(codes.shape[0]))
    return {"codes": codes, "num_codes": num_codes, "labels": labels, "classes": classes,
            "fingerprint": fingerprint, "data": info,
            "vqvae_checkpoint": os.path.abspath(vqvae_checkpoint)}


def _fit(inputs, out, state, steps, batch_size, lr, seed, device, conditions, model, log_every,
         checkpoint_every, progress, ctx=None, ema=EMA_DECAY):
    """The training loop on prepared inputs; ``state`` is the checkpoint to resume or None;
    ``ctx`` the `distributed.Context` (None: a single process); ``ema`` the averaging decay."""
    from ..data.dataset import split_indices

    ctx = ctx or distributed.Context(0, 1, 0, device, False)

    t0 = time.perf_counter()
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    log_path = os.path.join(out, LOG_NAME)
    codes_np, num_codes, labels = inputs["codes"], inputs["num_codes"], inputs["labels"]
    fingerprint, data = inputs["fingerprint"], inputs["data"]["path"]
    n = codes_np.shape[0]
    train_index = split_indices(n, "train")
    test_index = split_indices(n, "test")
    if train_index.size == 0:
        raise VQVAEInputError(f"{data}: no training stamps (N={n})")
    if batch_size * ctx.world_size > train_index.size:
        raise VQVAEInputError(f"train_prior: batch_size {batch_size}"
                              + (f" x {ctx.world_size} processes" if ctx.active else "")
                              + f" exceeds the {train_index.size} training code maps of {data}")
    norm = label_normalisation(labels[train_index], conditions)
    classes = inputs.get("classes")
    class_info = None if classes is None else {"label": classes["label"],
                                               "names": list(classes["names"])}
    config = dict(DEFAULT_MODEL, dropout=0.0)
    config.update(model)
    if config.pop("num_classes", 0):
        raise VQVAEInputError("train_prior: num_classes follows the class label; pass "
                              "class_label (--class-label NAME) instead")
    config.update(num_codes=num_codes, cond_dim=len(conditions),
                  num_classes=len(classes["names"]) if classes else 0)
    unknown = sorted(set(config) - set(inspect.signature(GatedPixelCNN).parameters))
    if unknown:
        raise VQVAEInputError(f"train_prior: unknown model option(s) {unknown}")
    train_info = {"batch_size": batch_size, "seed": seed, "conditions": list(conditions),
                  "ema": ema, "class_label": classes["label"] if classes else None}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            prior = GatedPixelCNN(**config)
        except TypeError as err:
            raise VQVAEInputError(f"train_prior: bad model option: {err}") from None
        average = GatedPixelCNN(**config)  # the moving average: what ships
    prior.to(device).train()
    average.to(device).eval()
    average.load_state_dict(prior.state_dict())
    average.requires_grad_(False)
    use_amp = device.type == "cuda"
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr, fused=use_amp or None)
    model_step = ctx.wrap(prior)  # gradients averaged over the ranks
    start = 0
    history = {"step": [], "train_bits_per_code": [], "test_bits_per_code": [], "lr": []}
    if state is not None:
        for key, mine, theirs in (("config", prior.config,
                                   dict(CONFIG_DEFAULTS, **state["config"])),
                                  ("training settings", train_info,
                                   dict(SETTING_DEFAULTS, **(state.get("train") or {}))),
                                  ("classes", class_info, state.get("classes")),
                                  ("codes", fingerprint, state.get("codes_fingerprint"))):
            if mine != theirs:
                raise VQVAEInputError(f"cannot resume {ckpt_path}: its {key} {theirs} differ from "
                                      f"this run's {mine}")
        prior.load_state_dict(state["model_raw"])
        average.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        history = {k: list(v) for k, v in state["history"].items()}
        if ctx.is_main:
            _trim_log(log_path, start)

    codes = torch.from_numpy(codes_np).to(device)
    cond = torch.from_numpy(((labels - np.asarray(norm["mean"])) / np.asarray(norm["std"]))
                            .astype(np.float32)).to(device) if conditions else None
    class_of = torch.from_numpy(classes["values"]).to(device) if classes else None
    train_dev = torch.from_numpy(train_index).to(device)
    test_dev = torch.from_numpy(test_index).to(device)
    eval_batch = max(batch_size, 256)
    per_epoch = train_index.size // (batch_size * ctx.world_size)
    data_info = inputs["data"]
    last = {"train": None, "test": None}

    def checkpoint(step):
        ctx.check_identical({**{"raw." + k: v for k, v in prior.state_dict().items()},
                             **{"average." + k: v for k, v in average.state_dict().items()}},
                            "prior weights")
        if not ctx.is_main:
            return
        save_checkpoint({
            "model": {k: v.detach().cpu() for k, v in average.state_dict().items()},
            "model_raw": {k: v.detach().cpu() for k, v in prior.state_dict().items()},
            "config": prior.config, "optimizer": optimizer.state_dict(), "step": step,
            "seed": seed, "history": history, "data": data_info, "conditions": norm,
            "vqvae_checkpoint": inputs["vqvae_checkpoint"],
            "test_bits_per_code": last["test"], "train": train_info,
            "codes_fingerprint": fingerprint, "classes": class_info}, ckpt_path)

    def log(step, loss_sum, count, started):
        train_bits = ctx.mean(loss_sum / count).item() / _LN2  # the host sync: at log time only
        rate = count * batch_size * ctx.world_size / max(1e-9, time.perf_counter() - started)
        if not math.isfinite(train_bits):
            raise FloatingPointError(f"prior training diverged at step {step} (loss "
                                     f"{train_bits}); lower lr (now {lr})")
        test_bits = (_evaluate(average, codes, cond, class_of, test_dev, eval_batch,
                               use_amp).item() / _LN2
                     if test_index.size and ctx.is_main else None)
        last.update(train=train_bits, test=test_bits)
        entry = {"step": step, "train_bits_per_code": train_bits, "test_bits_per_code": test_bits,
                 "lr": learning_rate(step - 1, lr), "maps_per_s": rate,
                 "elapsed_s": time.perf_counter() - t0}
        for k in history:
            history[k].append(entry[k])
        if ctx.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        bar.set_postfix(train=f"{train_bits:.3f}",
                        test=f"{test_bits:.3f}" if test_bits is not None else "-")

    bar = tqdm(total=steps, initial=min(start, steps), disable=not (progress and ctx.is_main),
               desc="training prior", unit="step")
    loss_sum = torch.zeros((), device=device)
    count = 0
    started = time.perf_counter()
    perm_epoch, perm = None, None
    params = list(prior.parameters())
    averaged = list(average.parameters())
    dropout = prior.dropout > 0
    # dropout draws from the global generators, reseeded at each step: leave the caller's alone
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, enabled=dropout), \
            contextlib.closing(bar):
        for step in range(start, steps):
            epoch, k = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm = epoch_permutation(seed, epoch, train_index.size)
                perm = perm.pin_memory() if device.type == "cuda" else perm
                perm = perm.to(device, non_blocking=True)
                perm_epoch = epoch
            idx = train_dev[perm[distributed.rank_slice(k, batch_size, ctx.rank, ctx.world_size)]]
            x = codes[idx]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr)
            if dropout:
                torch.manual_seed(dropout_seed(seed, step, ctx.rank))
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model_step(x, cond[idx] if cond is not None else None,
                                    class_of[idx] if class_of is not None else None)
            loss = F.cross_entropy(logits.float(), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(averaged, params, 1.0 - ema_decay(step, ema))
            loss_sum += loss.detach()
            count += 1
            bar.update(1)
            done = step + 1
            if done % log_every == 0 or done == steps:
                log(done, loss_sum, count, started)
                loss_sum.zero_()
                count = 0
                started = time.perf_counter()
            if done % checkpoint_every == 0 or done == steps:
                checkpoint(done)
        if start >= steps:  # nothing left to train: report the held-out NLL as it stands
            last["test"] = (_evaluate(average, codes, cond, class_of, test_dev, eval_batch,
                                      use_amp).item() / _LN2
                            if test_index.size and ctx.is_main else None)
            last["train"] = history["train_bits_per_code"][-1] if history["step"] else None
    return {"step": max(start, steps), "train_bits_per_code": last["train"],
            "test_bits_per_code": last["test"], "checkpoint": ckpt_path,
            "num_parameters": sum(p.numel() for p in prior.parameters()),
            "elapsed_s": time.perf_counter() - t0}

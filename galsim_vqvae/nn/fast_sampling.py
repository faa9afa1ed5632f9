"""Fast, cached autoregressive sampling of a Gated PixelCNN (Ramachandran et al. 2017,
arXiv:1704.06001).

`sample_naive` runs the whole network once per position. `sample_fast` computes every layer's output
only where it changes and returns the same code maps for the same seeds (the same Gumbel noise,
consumed in the same raster order, the same float64 scores; the logits differ from the naive ones
only by float64 rounding). The structure it exploits:

* The vertical stack at row r depends only on rows r-p .. r of its input (p = kernel_size // 2), and
  reaches the horizontal stack only through ``v_to_h`` of its pre-activation shifted down one row.
  So once row i-1 is complete, one pass of the vertical stack over that single row (per layer, a
  ``(p+1) x k`` convolution, as one matmul, over a cache of the last p+1 rows of the layer's
  vertical input) gives everything the horizontal stack of row i needs from above: ``v_to_h`` of
  it is precomputed for the whole row, together with the ``h_conv`` bias and the conditioning
  bias.
* The horizontal stack at (i, j) depends on its input at (i, j-p .. j) ('B' layers) or
  (i, j-p .. j-1) (the first, 'A' layer), on that row term and on nothing else; the head is
  1x1 convolutions. So at each position only one column of each layer is computed, from a
  per-layer buffer of the current row's horizontal inputs: one matmul for ``h_conv``, the gate,
  one matmul for ``h_out``.

All state is kept channels-last so that a layer's window over its row buffer is a contiguous
``[B, taps * C]`` view and ``h_conv`` is a single ``addmm`` with weights reshaped once (and the
vertical convolution of a row one ``addmm`` of an im2col of the cached rows). The caches'
memory is derived and measured in ``docs/sampling.md``.

Three implementations of the same scheme, all in float64 (see `sampling`): this module's PyTorch
one (the reference and the fallback), and the compiled op ``galsim_vqvae::pixelcnn_sample``
(``csrc/cpu/pixelcnn_sample.cpp``, ``csrc/cuda/pixelcnn_sample.cu``). `sample_fast` runs the op
where ``ops.sampler_backend(device)`` says it is available, else this module's loop, announced
once with a warning. `flat_weights` is the weight layout both share.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import ops
from ..errors import VQVAEInputError
from .sampling import check_sampling_arguments, derived_from, float64_prior, gumbel_noise

IMPLEMENTATIONS = ("auto", "compiled", "torch")


def cache_bytes(batch, layers, channels, width, kernel_size, num_codes, itemsize=8):
    """Bytes of the caches and per-position buffers `sample_fast` holds for one batch (the same in
    its three implementations).

    ``itemsize * batch * (L*C*((p+1)*(W+2p) + 2W) + (L+1)*C*(W+p) + 4C + 1 + K)`` with
    ``p = kernel_size // 2`` (derived in ``docs/sampling.md``); independent of the map height. On
    top come the output codes and the row step's scratch (`row_step_bytes`), and, in the PyTorch
    loop only, the Gumbel noise of the batch (``8 * batch * H * W * K`` bytes, as in
    `sample_naive`); the compiled ops compute the noise where they draw (K doubles per thread on
    the CPU).

    Parameters:
        batch:          Maps sampled together (at most `sample_fast`'s batch_size).
        layers:         The prior's number of layers L.
        channels:       The prior's channels C.
        width:          Map width W.
        kernel_size:    The prior's kernel size (p = kernel_size // 2).
        num_codes:      The prior's number of codes K.
        itemsize:       Bytes per element: 8, the samplers compute in float64. [default: 8]
    """
    b, L, c, w, p, k = batch, layers, channels, width, kernel_size // 2, num_codes
    return itemsize * b * (L * c * ((p + 1) * (w + 2 * p) + 2 * w) + (L + 1) * c * (w + p)
                           + 4 * c + 1 + k)


def row_step_bytes(batch, channels, width, kernel_size, im2col=True, itemsize=8):
    """Bytes of the scratch the vertical (once per row) step uses, on top of `cache_bytes`: the
    pre-activations of one row of one layer (``B*W*2C`` elements) and, where the convolution is
    one matrix product over an im2col of the cached rows (the PyTorch and CUDA implementations,
    ``im2col=True``), that im2col (``B*W*(p+1)*k*C`` elements). The C++ CPU kernel reads the
    cached rows in place (``im2col=False``)."""
    b, c, w, k = batch, channels, width, kernel_size
    p = k // 2
    return itemsize * b * w * (2 * c + ((p + 1) * k * c if im2col else 0))


def flat_weights(prior):
    """The weights of a float64 `GatedPixelCNN` in the layout of ``galsim_vqvae::pixelcnn_sample``
    (every matrix as ``[inputs, outputs]`` for ``x @ W``), stacked over the L layers; cached while
    the prior's weights stay unchanged.

    With ``p = kernel_size // 2``, ``k = kernel_size``, C channels and K codes:

    ``embedding`` [K, C]; ``v_w`` [L, (p+1)*k*C, 2C], row ``(dr*k + dc)*C + c`` =
    ``v_conv.weight[:, c, dr, dc]``; ``v_b`` [L, 2C]; ``h_w`` [L, (p+1)*C, 2C], row ``t*C + c`` =
    ``h_conv.weight[:, c, 0, t]`` (the first layer has p taps: its rows from ``p*C`` on are zero
    and never read); ``h_b`` [L, 2C]; ``vh_w`` [L, 2C, 2C] (``v_to_h``), ``vh_b`` [L, 2C];
    ``out_w`` [L, C, C] (``h_out``), ``out_b`` [L, C]; ``head1_w`` [C, C], ``head1_b`` [C],
    ``head2_w`` [C, K], ``head2_b`` [K]: the head's two 1x1 convolutions.
    """

    def build(prior):
        with torch.no_grad():
            layers = prior.layers
            p = prior.kernel_size // 2
            c, c2 = prior.channels, 2 * prior.channels
            h_w = torch.zeros(len(layers), (p + 1) * c, c2, dtype=torch.float64,
                              device=prior.embedding.weight.device)
            for l, layer in enumerate(layers):
                w = layer.h_conv.weight[:, :, 0, :].permute(2, 1, 0).reshape(-1, c2)
                h_w[l, :w.shape[0]] = w
            conv1, conv2 = prior.head[1], prior.head[3]
            return dict(
                embedding=prior.embedding.weight.detach().contiguous(),
                v_w=torch.stack([l.v_conv.weight.permute(2, 3, 1, 0).reshape(-1, c2)
                                 for l in layers]).contiguous(),
                v_b=torch.stack([l.v_conv.bias for l in layers]).contiguous(),
                h_w=h_w,
                h_b=torch.stack([l.h_conv.bias for l in layers]).contiguous(),
                vh_w=torch.stack([l.v_to_h.weight[:, :, 0, 0].t() for l in layers]).contiguous(),
                vh_b=torch.stack([l.v_to_h.bias for l in layers]).contiguous(),
                out_w=torch.stack([l.h_out.weight[:, :, 0, 0].t() for l in layers]).contiguous(),
                out_b=torch.stack([l.h_out.bias for l in layers]).contiguous(),
                head1_w=conv1.weight[:, :, 0, 0].t().contiguous(), head1_b=conv1.bias.detach(),
                head2_w=conv2.weight[:, :, 0, 0].t().contiguous(), head2_b=conv2.bias.detach())

    if next(prior.parameters()).dtype != torch.float64:
        raise VQVAEInputError("flat_weights: pass the float64 prior (sampling.float64_prior)")
    return derived_from(prior, "flat_weights", build)


class _Weights:
    """Per-layer views of `flat_weights` for the PyTorch loop: ``v_w``, ``v_b``, ``h_w`` (the
    first layer's p taps only), ``h_b``, ``vh_w``, ``vh_b`` and ``out_wb`` [C+1, C]: ``out_w``
    with ``out_b`` as its last row (the gate buffer ends with a column of ones)."""

    def __init__(self, prior):
        flat = flat_weights(prior)
        p, c = prior.kernel_size // 2, prior.channels
        self.layers = []
        for l in range(prior.num_layers):
            taps = p if l == 0 else p + 1
            self.layers.append(dict(
                v_w=flat["v_w"][l], v_b=flat["v_b"][l], h_w=flat["h_w"][l, :taps * c],
                h_b=flat["h_b"][l], vh_w=flat["vh_w"][l], vh_b=flat["vh_b"][l],
                out_wb=torch.cat([flat["out_w"][l], flat["out_b"][l][None]])))
        self.head1_w, self.head1_b = flat["head1_w"], flat["head1_b"]
        self.head2_w, self.head2_b = flat["head2_w"], flat["head2_b"]
        self.embedding = flat["embedding"]


class _Caches:
    """Every tensor the sampler keeps for one batch of B maps (all channels-last).

    ``v[l]``     [B, p+1, W+2p, C]: the last p+1 rows of layer l's vertical input, zero-padded
                 left and right by p (rows above the map are zeros: the top padding).
    ``row[l]``   [B, W, 2C]: what the horizontal pre-activation of layer l gets at each column of
                 the current row besides its own window: ``v_to_h`` of the vertical pre-activation
                 of the row above, the ``h_conv`` bias and the conditioning bias.
    ``h[l]``     [B, W+p, C]: layer l's horizontal input along the current row, zero-padded left
                 by p (``h[0]`` holds the embeddings of the codes drawn so far in the row);
                 ``h[L]`` is the last layer's output, the head's input.
    Plus per-position scratch: ``pre`` [B, 2C], ``gate`` [B, C+1] (the gated units and a
    constant 1 that picks ``h_out``'s bias), ``head`` [B, C] and ``logits`` [B, K].
    """

    def __init__(self, batch, num_layers, channels, width, pad, num_codes, dtype, device):
        kw = dict(dtype=dtype, device=device)
        b, c, w, p = batch, channels, width, pad
        self.v = [torch.zeros(b, p + 1, w + 2 * p, c, **kw) for _ in range(num_layers)]
        self.row = [torch.empty(b, w, 2 * c, **kw) for _ in range(num_layers)]
        self.h = [torch.zeros(b, w + p, c, **kw) for _ in range(num_layers + 1)]
        self.pre = torch.empty(b, 2 * c, **kw)
        self.gate = torch.ones(b, c + 1, **kw)
        self.head = torch.empty(b, c, **kw)
        self.logits = torch.empty(b, num_codes, **kw)

    def tensors(self):
        return [*self.v, *self.row, *self.h, self.pre, self.gate, self.head, self.logits]

    @property
    def nbytes(self):
        """Bytes held by the caches and scratch buffers."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _vertical_row(weights, caches, biases, codes_row, first_row):
    """Advance the vertical stack by one row and set each layer's per-row horizontal term.

    ``codes_row`` [B, W] are the codes of the row just completed (ignored when ``first_row``: then
    the row above is the zero padding, so ``v_to_h`` of it is its bias alone, as in the network).
    Each layer's ``(p+1) x k`` convolution over its cached rows is one matmul of their im2col
    [B*W, (p+1)*k*C] with the reshaped weight.
    """
    batch, rows, padded, channels = caches.v[0].shape
    p = rows - 1
    width = padded - 2 * p
    num_layers = len(weights.layers)
    if not first_row:
        cache = caches.v[0]
        cache[:, :-1] = cache[:, 1:].clone()
        cache[:, -1, p:p + width] = weights.embedding[codes_row]
    for l, w in enumerate(weights.layers):
        row = caches.row[l]
        if first_row:
            row.copy_(w["vh_b"].expand_as(row))
        else:
            cols = caches.v[l].unfold(2, 2 * p + 1, 1)               # [B, p+1, W, C, k]
            cols = cols.permute(0, 2, 1, 4, 3).reshape(batch * width, -1)
            v_pre = torch.addmm(w["v_b"], cols, w["v_w"])            # [B*W, 2C]
            torch.addmm(w["vh_b"], v_pre, w["vh_w"], out=row.view(batch * width, -1))
            if l + 1 < num_layers:
                v_pre = v_pre.view(batch, width, -1)
                if biases[l] is not None:
                    v_pre = v_pre + biases[l][:, None, :]
                nxt = caches.v[l + 1]
                nxt[:, :-1] = nxt[:, 1:].clone()
                torch.mul(torch.tanh(v_pre[..., :channels]), torch.sigmoid(v_pre[..., channels:]),
                          out=nxt[:, -1, p:p + width])
        row += w["h_b"]
        if biases[l] is not None:
            row += biases[l][:, None, :]


class _PositionViews:
    """Views into the caches, made once per batch so that the loop over positions only launches
    the arithmetic. For layer l and column j: ``window[l][j]`` [B, taps*C] (layer l's horizontal
    input at columns j-p .. j, or .. j-1 for the first layer), ``row[l][j]`` [B, 2C],
    ``resid[l][j]`` [B, C] (layer l's input at column j), ``out[l][j]`` [B, C] (its output) and
    ``embed[j]`` [B, C] (the first layer's input at column j: the drawn code's embedding); for
    position (i, j): ``codes[i][j]`` [B] and ``noise[i][j]`` [B, K]."""

    def __init__(self, caches, codes, noise):
        p = caches.h[0].shape[1] - caches.row[0].shape[1]
        batch, width, c2 = caches.row[0].shape
        c = c2 // 2
        layers = range(len(caches.row))
        cols = range(width)
        self.window = [[caches.h[l][:, j:j + (p if l == 0 else p + 1)].view(batch, -1)
                        for j in cols] for l in layers]
        self.row = [[caches.row[l][:, j] for j in cols] for l in layers]
        self.resid = [[caches.h[l][:, p + j] for j in cols] for l in layers]
        self.out = [[caches.h[l + 1][:, p + j] for j in cols] for l in layers]
        self.last = [caches.h[-1][:, p + j] for j in cols]
        self.embed = [caches.h[0][:, p + j] for j in cols]
        self.codes = [[codes[:, i, j] for j in cols] for i in range(codes.shape[1])]
        self.noise = [[noise[:, i, j] for j in cols] for i in range(codes.shape[1])]
        self.pre_a = caches.pre[:, :c]
        self.gate = caches.gate[:, :c]


def _position(weights, caches, views, j):
    """Run the horizontal stack and the head at column ``j``; fills ``caches.logits``."""
    pre, gate, pre_a, gated = caches.pre, caches.gate, views.pre_a, views.gate
    for l, w in enumerate(weights.layers):
        torch.addmm(views.row[l][j], views.window[l][j], w["h_w"], out=pre)
        pre_a.tanh_()
        torch._C._nn.glu(pre, 1, out=gated)  # F.glu with out=: tanh(a) * sigmoid(b)
        if l == 0:  # 'A' layer: no residual
            torch.mm(gate, w["out_wb"], out=views.out[l][j])
        else:       # h_out(gate) + its bias (the ones column) + the residual, in one call
            torch.addmm(views.resid[l][j], gate, w["out_wb"], out=views.out[l][j])
    head = caches.head
    torch.addmm(weights.head1_b, F.elu(views.last[j]), weights.head1_w, out=head)
    torch.addmm(weights.head2_b, F.elu(head, inplace=True), weights.head2_w, out=caches.logits)


def _sample_torch(network, codes, cond, class_label, seeds, temperature, bar):
    """The PyTorch cached loop over one batch: fills ``codes`` [B, H, W] (float64 ``network``)."""
    batch, height, width = codes.shape
    device = codes.device
    noise = gumbel_noise(seeds, (height, width), network.num_codes).to(device)
    weights = _Weights(network)
    biases = [None if b is None else b[:, :, 0, 0]
              for b in network._layer_biases(batch, cond, class_label, torch.float64)]
    caches = _Caches(batch, network.num_layers, network.channels, width,
                     network.kernel_size // 2, network.num_codes, torch.float64, device)
    scores = torch.empty(batch, network.num_codes, dtype=torch.float64, device=device)
    views = _PositionViews(caches, codes, noise)
    for i in range(height):
        _vertical_row(weights, caches, biases, codes[:, i - 1] if i else None, first_row=(i == 0))
        for j in range(width):
            _position(weights, caches, views, j)
            # sample_naive's expression: float64 logits / temperature + float64 noise, argmax.
            torch.div(caches.logits, temperature, out=scores)
            scores += views.noise[i][j]
            drawn = torch.argmax(scores, dim=1, out=views.codes[i][j])
            torch.index_select(weights.embedding, 0, drawn, out=views.embed[j])
        bar.update(batch * width)


def _sample_compiled(network, codes, cond, class_label, seeds, temperature, bar):
    """One batch through the compiled op ``galsim_vqvae::pixelcnn_sample`` (the noise is computed
    inside it): fills ``codes``."""
    batch, height, width = codes.shape
    biases = network._layer_biases(batch, cond, class_label, torch.float64)
    bias = None if biases[0] is None else torch.stack([b[:, :, 0, 0] for b in biases], 1)
    drawn, _ = ops.pixelcnn_sample(flat_weights(network), bias,
                                   ops.seeds_tensor(seeds, codes.device), (height, width),
                                   temperature, network.kernel_size)
    codes.copy_(drawn)
    bar.update(batch * height * width)


def sample_fast(prior, n, shape=(21, 21), cond=None, class_label=None, seeds=None,
                temperature=1.0, progress=False, batch_size=256, implementation="auto"):
    """Draw ``n`` code maps with per-layer caches: the same maps as `sample_naive`, much faster.

    The vertical stack runs once per row and the horizontal stack and head once per position, so a
    map costs about one full forward pass of the prior instead of H * W of them. It consumes the
    same per-sample Gumbel noise as `sample_naive` in the same order and, like it, evaluates the
    logits in float64, so for the same seeds it returns the same maps: the logits differ from the
    naive ones by float64 rounding alone (~1e-15), and a code could differ only where the two best
    scores of a draw are that close (see ``docs/sampling.md``).

    Parameters:
        prior:          A `GatedPixelCNN` on any device and of any floating dtype (evaluated in
                        float64, see `sampling.float64_prior`).
        n:              Number of code maps.
        shape:          (H, W) of the code maps. [default: (21, 21)]
        cond:           Normalised labels [n, cond_dim] (tensor or array), required iff
                        prior.cond_dim > 0. [default: None]
        class_label:    Class labels [n] (ints), required iff prior.num_classes > 0.
                        [default: None]
        seeds:          List of n non-negative ints, one per sample (see `per_sample_seeds`);
                        None draws fresh seeds (not reproducible). [default: None]
        temperature:    Softmax temperature, > 0: samples follow softmax(logits / temperature).
                        [default: 1.0]
        progress:       Show a progress bar (per position with the PyTorch loop, per batch with
                        the compiled op). [default: False]
        batch_size:     Samples run together; does not change the result. [default: 256]
        implementation: ``"auto"``: the compiled op where ``ops.sampler_backend(device)`` says it
                        runs, else the PyTorch loop (announced once with a warning);
                        ``"compiled"``: the op, an error if it is not available; ``"torch"``:
                        the PyTorch loop (the reference). [default: "auto"]

    Returns:
        codes [n, H, W] int64 tensor on the prior's device.
    """
    a = check_sampling_arguments(prior, n, shape, cond, class_label, seeds, temperature,
                                 batch_size, who="sample_fast")
    n, (height, width), device = a["n"], a["shape"], a["device"]
    if implementation not in IMPLEMENTATIONS:
        raise VQVAEInputError(f"sample_fast: implementation must be one of {IMPLEMENTATIONS}, "
                              f"got {implementation!r}")
    if implementation == "torch":
        run = _sample_torch
    else:
        backend = ops.sampler_backend(device, announce=(implementation == "auto"))
        if backend == "torch" and implementation == "compiled":
            raise VQVAEInputError(f"sample_fast: the compiled sampler is not available on "
                                  f"{device}: {ops.sampler_load_error(device)}")
        run = _sample_torch if backend == "torch" else _sample_compiled
    out = torch.empty(n, height, width, dtype=torch.int64, device=device)
    if n == 0:
        return out
    was_training = prior.training
    prior.eval()
    bar = tqdm(total=n * height * width, disable=not progress, desc="sampling codes (fast)",
               unit="code")
    try:
        with torch.no_grad():
            network = float64_prior(prior)
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                c = a["cond"][start:stop] if a["cond"] is not None else None
                k = a["class_label"][start:stop] if a["class_label"] is not None else None
                run(network, out[start:stop], c, k, a["seeds"][start:stop], a["temperature"], bar)
    finally:
        bar.close()
        prior.train(was_training)
    return out

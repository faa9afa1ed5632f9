"""Fast, cached autoregressive sampling of a Gated PixelCNN (Ramachandran et al. 2017,
arXiv:1704.06001).

`sample_naive` runs the whole network once per position. `sample_fast` computes every layer's output
only where it changes and returns the same code maps for the same seeds (the same Gumbel noise,
consumed in the same raster order with the same dtype promotion; the logits differ from the naive
ones only by floating-point rounding). The structure it exploits:

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
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .sampling import check_sampling_arguments, gumbel_noise


def _check_arguments(prior, n, shape, cond, class_label, seeds, temperature, batch_size):
    """Validate and normalise `sample_fast`'s arguments (`sample_naive`'s rules, shared)."""
    a = check_sampling_arguments(prior, n, shape, cond, class_label, seeds, temperature,
                                 batch_size, who="sample_fast")
    return (a["n"], a["shape"], a["cond"], a["class_label"], a["seeds"], a["temperature"],
            a["device"], a["dtype"])


def cache_bytes(batch, layers, channels, width, kernel_size, num_codes, itemsize=4):
    """Bytes of the caches and scratch buffers `sample_fast` holds for one batch.

    ``itemsize * batch * (L*C*((p+1)*(W+2p) + 2W) + (L+1)*C*(W+p) + 4C + 1 + K)`` with
    ``p = kernel_size // 2`` (derived in ``docs/sampling.md``); independent of the map height. The
    Gumbel noise of the batch (``4 * batch * H * W * K`` bytes, as in `sample_naive`) comes on top.

    Parameters:
        batch:          Maps sampled together (at most `sample_fast`'s batch_size).
        layers:         The prior's number of layers L.
        channels:       The prior's channels C.
        width:          Map width W.
        kernel_size:    The prior's kernel size (p = kernel_size // 2).
        num_codes:      The prior's number of codes K.
        itemsize:       Bytes per element of the prior's dtype. [default: 4]
    """
    b, L, c, w, p, k = batch, layers, channels, width, kernel_size // 2, num_codes
    return itemsize * b * (L * c * ((p + 1) * (w + 2 * p) + 2 * w) + (L + 1) * c * (w + p)
                           + 4 * c + 1 + k)


class _Weights:
    """The prior's weights, reshaped once for channels-last matmuls (views or small copies).

    For layer l: ``v_w`` [(p+1)*k*C, 2C] with row ``(dr*k + dc)*C + c`` =
    ``v_conv.weight[:, c, dr, dc]`` (for a matmul with the im2col of the cached rows), ``v_b`` [2C];
    ``h_w`` [taps*C, 2C] with row ``t*C + c`` = ``h_conv.weight[:, c, 0, t]``; ``h_b`` [2C];
    ``vh_w`` [2C, 2C] (transposed ``v_to_h``), ``vh_b`` [2C]; ``out_wb`` [C+1, C]: transposed
    ``h_out`` weight with its bias as the last row (the gate buffer ends with a column of ones).
    """

    def __init__(self, prior):
        self.layers = []
        for layer in prior.layers:
            c2 = layer.h_conv.weight.shape[0]
            self.layers.append(dict(
                v_w=layer.v_conv.weight.permute(2, 3, 1, 0).reshape(-1, c2).contiguous(),
                v_b=layer.v_conv.bias,
                h_w=layer.h_conv.weight[:, :, 0, :].permute(2, 1, 0).reshape(-1, c2).contiguous(),
                h_b=layer.h_conv.bias,
                vh_w=layer.v_to_h.weight[:, :, 0, 0].t().contiguous(), vh_b=layer.v_to_h.bias,
                out_wb=torch.cat([layer.h_out.weight[:, :, 0, 0].t(), layer.h_out.bias[None]])))
        conv1, conv2 = prior.head[1], prior.head[3]
        self.head1_w = conv1.weight[:, :, 0, 0].t().contiguous()
        self.head1_b = conv1.bias
        self.head2_w = conv2.weight[:, :, 0, 0].t().contiguous()
        self.head2_b = conv2.bias
        self.embedding = prior.embedding.weight


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


def sample_fast(prior, n, shape=(21, 21), cond=None, class_label=None, seeds=None,
                temperature=1.0, progress=False, batch_size=256):
    """Draw ``n`` code maps with per-layer caches: the same maps as `sample_naive`, much faster.

    The vertical stack runs once per row and the horizontal stack and head once per position, so a
    map costs about one full forward pass of the prior instead of H * W of them. It consumes the
    same per-sample Gumbel noise as `sample_naive` in the same order, so for the same seeds it
    returns the same maps. The logits differ from the naive ones only by rounding (the same sums in
    another order), so a code can differ only at a rounding-level tie of the two best scores: never
    seen in float64, vanishingly rare in float32 (see ``docs/sampling.md``).

    Parameters:
        prior:          A `GatedPixelCNN` on any device; float32 or float64 (float16 and bfloat16
                        run too, the scores in float32 as in `sample_naive`).
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
        progress:       Show a progress bar over positions. [default: False]
        batch_size:     Samples run together; does not change the result. [default: 256]

    Returns:
        codes [n, H, W] int64 tensor on the prior's device.
    """
    n, (height, width), cond, class_label, seeds, temperature, device, dtype = _check_arguments(
        prior, n, shape, cond, class_label, seeds, temperature, batch_size)
    out = torch.empty(n, height, width, dtype=torch.int64, device=device)
    if n == 0:
        return out
    pad = prior.kernel_size // 2
    was_training = prior.training
    prior.eval()
    bar = tqdm(total=n * height * width, disable=not progress, desc="sampling codes (fast)",
               unit="code")
    try:
        with torch.no_grad():
            weights = _Weights(prior)
            score_dtype = torch.promote_types(dtype, torch.float32)
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                batch = stop - start
                noise = gumbel_noise(seeds[start:stop], (height, width), prior.num_codes)
                noise = noise.to(device)
                c = cond[start:stop] if cond is not None else None
                k = class_label[start:stop] if class_label is not None else None
                biases = [None if b is None else b[:, :, 0, 0]
                          for b in prior._layer_biases(batch, c, k, dtype)]
                caches = _Caches(batch, prior.num_layers, prior.channels, width, pad,
                                 prior.num_codes, dtype, device)
                codes = out[start:stop]
                scores = torch.empty(batch, prior.num_codes, dtype=score_dtype, device=device)
                views = _PositionViews(caches, codes, noise)
                for i in range(height):
                    _vertical_row(weights, caches, biases, codes[:, i - 1] if i else None,
                                  first_row=(i == 0))
                    for j in range(width):
                        _position(weights, caches, views, j)
                        # sample_naive's expression, same dtype promotion and order:
                        # logits.to(score_dtype) / temperature + noise[:, i, j], then argmax.
                        torch.div(caches.logits.to(score_dtype), temperature, out=scores)
                        scores += views.noise[i][j]
                        drawn = torch.argmax(scores, dim=1, out=views.codes[i][j])
                        torch.index_select(weights.embedding, 0, drawn, out=views.embed[j])
                    bar.update(batch * width)
    finally:
        bar.close()
        prior.train(was_training)
    return out

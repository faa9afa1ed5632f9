"""Gated PixelCNN prior over VQ-VAE code maps (van den Oord et al. 2016, arXiv:1606.05328).

The network maps a code map ``codes[B, H, W]`` to logits ``[B, K, H, W]``, where the logits at
position (i, j) depend only on the codes strictly earlier in raster order: every row above in full
width, and the columns left of j in row i. There is no blind spot: two stacks work together.

* The vertical stack convolves with a ``(k//2 + 1) x k`` kernel padded at the top, so its feature at
  row r sees rows r - k//2 .. r (never a row below). It reaches the horizontal stack only after a
  shift down by one row, so what the horizontal stack receives at row r comes from rows < r.
* The horizontal stack convolves along the current row with a ``1 x (k//2 + 1)`` kernel padded on
  the left ('B': columns c - k//2 .. c); its first layer ('A') uses a ``1 x k//2`` kernel that
  stops at column c - 1 and has no residual connection, so a position never sees its own code.
* Gated units ``tanh(a) * sigmoid(b)``; the vertical-to-horizontal link is a 1x1 convolution of the
  shifted vertical pre-activation; the horizontal stack is residual after the first layer.
* Reach: each layer extends the context by k//2 columns to the left and, through the vertical
  stack, by k//2 rows up and k//2 columns either side, so the context of a position is the whole
  past only for enough layers; on a 21x21 map that takes 10 layers of k=5 (7 of k=7). Fewer layers
  see a causal subset of the past (``tests/test_pixelcnn.py`` computes it exactly).
* Dropout (``dropout`` > 0): in training mode only, on the gated output of each layer's
  horizontal stack before its 1x1 convolution; it acts on each position's own features, so
  causality is untouched, and sampling and evaluation (eval mode) never see it.
* Conditioning: ``cond_dim`` continuous labels (already normalised) and/or a class label
  (``num_classes``) enter every gate of both stacks through a per-layer linear projection (an
  embedding for the class) added to the pre-activations.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VQVAEInputError


def _gate(x):
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks.

    Parameters:
        channels:       Feature channels of each stack.
        kernel_size:    Odd kernel size k of the vertical (k//2+1 x k) and horizontal (1 x k//2+1)
                        convolutions.
        first:          Whether this is the first layer ('A': the horizontal stack excludes the
                        current position and has no residual). [default: False]
        dropout:        Dropout probability of the gated horizontal features in training mode.
                        [default: 0]
    """

    def __init__(self, channels, kernel_size, first=False, dropout=0.0):
        super().__init__()
        self.first = first
        self.dropout = dropout
        self.pad = kernel_size // 2
        p = self.pad
        self.v_conv = nn.Conv2d(channels, 2 * channels, (p + 1, kernel_size))
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, p if first else p + 1))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)

    def forward(self, v, h, bias=None):
        """(v, h [B, C, H, W], bias [B, 2C, 1, 1] or None) -> (v, h) of the next layer."""
        p = self.pad
        height, width = h.shape[-2:]
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))            # row r sees rows r-p .. r
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :height]     # row r gets rows < r
        h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0)))[..., :width]  # 'A': c-p..c-1, 'B': c-p..c
        h_pre = h_pre + self.v_to_h(v_down)
        if bias is not None:
            v_pre = v_pre + bias
            h_pre = h_pre + bias
        gated = _gate(h_pre)
        if self.dropout and self.training:
            gated = F.dropout(gated, self.dropout, training=True)
        h_new = self.h_out(gated)
        if not self.first:
            h_new = h_new + h
        return _gate(v_pre), h_new


class GatedPixelCNN(nn.Module):
    """Autoregressive prior over code maps: ``forward(codes[B,H,W])`` -> logits ``[B,K,H,W]``.

    Parameters:
        num_codes:      Number of codes K of the VQ-VAE codebook. [default: 512]
        channels:       Feature channels of each stack. [default: 128]
        layers:         Number of gated layers. [default: 15]
        kernel_size:    Odd kernel size (>= 3) of the stacks' convolutions. [default: 5]
        cond_dim:       Number of continuous conditioning labels (0: none). [default: 0]
        num_classes:    Number of class labels (0: none). [default: 0]
        dropout:        Dropout probability in the gated layers, in training mode only (see the
                        module's notes). [default: 0]
    """

    def __init__(self, num_codes=512, channels=128, layers=15, kernel_size=5, cond_dim=0,
                 num_classes=0, dropout=0.0):
        super().__init__()
        for name, value, low in (("num_codes", num_codes, 2), ("channels", channels, 1),
                                 ("layers", layers, 1), ("kernel_size", kernel_size, 3),
                                 ("cond_dim", cond_dim, 0), ("num_classes", num_classes, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise VQVAEInputError(f"GatedPixelCNN: {name} must be an int >= {low}, "
                                      f"got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            raise VQVAEInputError(f"GatedPixelCNN: dropout must be a number in [0, 1), "
                                  f"got {dropout!r}")
        if kernel_size % 2 != 1:
            raise VQVAEInputError(f"GatedPixelCNN: kernel_size must be odd, got {kernel_size}")
        self.num_codes = num_codes
        self.channels = channels
        self.num_layers = layers
        self.kernel_size = kernel_size
        self.cond_dim = cond_dim
        self.num_classes = num_classes
        self.dropout = float(dropout)

        self.embedding = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, first=(i == 0), dropout=self.dropout)
            for i in range(layers))
        # One projection for all layers (same maths as one per layer, fewer kernel launches).
        self.cond_proj = nn.Linear(cond_dim, layers * 2 * channels) if cond_dim else None
        self.class_embedding = (nn.Embedding(num_classes, layers * 2 * channels)
                                if num_classes else None)
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 1), nn.ELU(),
                                  nn.Conv2d(channels, num_codes, 1))

    @property
    def config(self):
        """Constructor keyword arguments: ``GatedPixelCNN(**prior.config)`` rebuilds it."""
        return dict(num_codes=self.num_codes, channels=self.channels, layers=self.num_layers,
                    kernel_size=self.kernel_size, cond_dim=self.cond_dim,
                    num_classes=self.num_classes, dropout=self.dropout)

    def _layer_biases(self, batch, cond, class_label, dtype):
        """Per-layer conditioning biases [L][B, 2C, 1, 1], or a list of None."""
        if self.cond_dim:
            if cond is None:
                raise VQVAEInputError(f"GatedPixelCNN: this prior is conditional on {self.cond_dim}"
                                      " labels; pass cond [B, cond_dim]")
            if cond.dim() != 2 or cond.shape[0] != batch or cond.shape[1] != self.cond_dim:
                raise VQVAEInputError(f"GatedPixelCNN: cond must have shape [{batch}, "
                                      f"{self.cond_dim}], got {list(cond.shape)}")
        elif cond is not None:
            raise VQVAEInputError("GatedPixelCNN: cond given to a prior built with cond_dim=0")
        if self.num_classes:
            if class_label is None:
                raise VQVAEInputError(f"GatedPixelCNN: this prior takes a class label "
                                      f"(num_classes={self.num_classes}); pass class_label [B]")
            if class_label.shape != (batch,) or class_label.is_floating_point():
                raise VQVAEInputError(f"GatedPixelCNN: class_label must be an integer tensor of "
                                      f"shape [{batch}], got {class_label.dtype} "
                                      f"{list(class_label.shape)}")
        elif class_label is not None:
            raise VQVAEInputError("GatedPixelCNN: class_label given to a prior built with "
                                  "num_classes=0")
        total = None
        if self.cond_proj is not None:
            total = self.cond_proj(cond.to(dtype))
        if self.class_embedding is not None:
            emb = self.class_embedding(class_label.long())
            total = emb if total is None else total + emb
        if total is None:
            return [None] * self.num_layers
        total = total.view(batch, self.num_layers, 2 * self.channels, 1, 1)
        return total.unbind(1)

    def forward(self, codes, cond=None, class_label=None):
        """Logits of each position given the codes before it in raster order.

        Parameters:
            codes:          Integer tensor [B, H, W] of codes in [0, num_codes).
            cond:           Float tensor [B, cond_dim] of normalised labels (required iff
                            cond_dim > 0). [default: None]
            class_label:    Integer tensor [B] of class labels (required iff num_classes > 0).
                            [default: None]

        Returns:
            logits [B, num_codes, H, W].
        """
        if codes.dim() != 3 or codes.is_floating_point() or codes.is_complex():
            raise VQVAEInputError(f"GatedPixelCNN: codes must be an integer tensor [B, H, W], "
                                  f"got {codes.dtype} {list(codes.shape)}")
        x = self.embedding(codes.long()).permute(0, 3, 1, 2).contiguous()
        biases = self._layer_biases(codes.shape[0], cond, class_label, x.dtype)
        v = h = x
        for layer, bias in zip(self.layers, biases):
            v, h = layer(v, h, bias)
        return self.head(h)

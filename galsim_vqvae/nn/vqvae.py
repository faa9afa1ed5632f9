"""The VQ-VAE: a convolutional encoder, a vector quantizer and a decoder of non-negative images.

After rosinality's ``vq-vae-2-pytorch`` (one level): the encoder halves the stamp twice with
stride-2 4x4 convolutions (84 -> 42 -> 21), refines with a 3x3 convolution and a residual stack,
and projects to the code dimension with a 1x1 convolution; the decoder mirrors it, upsampling by
bilinear resizes + convolutions (or transposed convolutions), padded by repeating the edge pixels
(or, in models made before 2026-12-07, with zeros). The model works in physical pixel
units (flux per pixel): it divides its input by ``image_scale`` and multiplies its output by it.
The decoded image is the pre-PSF galaxy, non-negative by construction: `positive` (a ReLU, or
the softplus of models made before 2026-11-24, with a one-sided leaky gradient so that the output
can never stay dark) of the last layer.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import VQVAEInputError
from .quantizer import VectorQuantizer


class ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``."""

    def __init__(self, channels, res_hidden, padding_mode="zeros"):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_hidden, 3, padding=1, padding_mode=padding_mode),
            nn.ReLU(),
            nn.Conv2d(res_hidden, channels, 1, padding_mode=padding_mode),
        )

    def forward(self, x):
        return x + self.block(x)


class ResidualStack(nn.Sequential):
    """``n`` `ResBlock` followed by a ReLU."""

    def __init__(self, channels, res_hidden, n, padding_mode="zeros"):
        super().__init__(*[ResBlock(channels, res_hidden, padding_mode) for _ in range(n)],
                         nn.ReLU())


class Encoder(nn.Module):
    """Image [B, 1, S, S] -> latents [B, embed_dim, S/4, S/4].

    ``padding_mode`` (``"zeros"`` or ``"replicate"``) is that of every convolution: with zeros
    the sky along each side of a stamp looks unlike the interior's and gets codes of its own,
    which the prior must then place side by side; with replicate padding the sky is encoded
    alike everywhere.
    """

    def __init__(self, hidden=128, res_blocks=2, res_hidden=32, embed_dim=64,
                 padding_mode="zeros"):
        super().__init__()
        pad = dict(padding=1, padding_mode=padding_mode)
        self.net = nn.Sequential(
            nn.Conv2d(1, hidden // 2, 4, stride=2, **pad),       # S   -> S/2
            nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, **pad),  # S/2 -> S/4
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, **pad),
            ResidualStack(hidden, res_hidden, res_blocks, padding_mode),
            nn.Conv2d(hidden, embed_dim, 1),
        )

    def forward(self, x):
        return self.net(x)


UPSAMPLES = ("bilinear", "nearest", "transpose")
PADDINGS = ("zeros", "replicate")


def upsample2(c_in, c_out, mode, padding_mode="zeros"):
    """Double the resolution: a stride-2 4x4 transposed convolution (``"transpose"``), or a
    ``"nearest"`` or ``"bilinear"`` resize followed by a 3x3 convolution (free of the checkerboard
    that transposed convolutions leave in the frequencies the PSF does not constrain).

    Both resizes clamp at the edges, and with ``padding_mode="replicate"`` the convolution sees
    the edge pixels repeated outwards. The transposed convolution pads with zeros only: repeating
    the edge pixels of its 2-periodic (checkerboard) output still leaves a frame one layer on.
    """
    if mode not in UPSAMPLES:
        raise VQVAEInputError(f"upsample must be one of {UPSAMPLES}, got {mode!r}")
    if mode == "transpose":
        if padding_mode != "zeros":
            raise VQVAEInputError(f"upsample='transpose' needs decoder_padding='zeros' (transposed "
                                  f"convolutions pad with zeros), got {padding_mode!r}")
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode),
                         nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode))


OUTPUTS = ("relu", "softplus", "linear")


class _Positive(torch.autograd.Function):
    """relu or softplus with a one-sided gradient leak (see `positive`)."""

    @staticmethod
    def forward(ctx, x, leak, output):
        ctx.save_for_backward(x)
        ctx.leak = leak
        ctx.output = output
        return F.relu(x) if output == "relu" else F.softplus(x)  # (never called for linear)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        slope = (x > 0).to(grad.dtype) if ctx.output == "relu" else torch.sigmoid(x)
        return grad * slope + ctx.leak * grad.clamp(max=0), None, None


def positive(x, leak=0.01, output="relu"):
    """``relu(x)`` (or ``softplus(x)``), whose gradient leaks only where the loss wants the output
    to grow.

    The gradient is ``g * f'(x) + leak * min(g, 0)`` for an upstream gradient ``g``. A unit in the
    flat negative part has no gradient of its own and would stay dark; the leak gives it a way
    back up. The leak is one-sided on purpose: a leak that also pushes down never vanishes over the
    empty sky (where any positive value is too much), and its small constant push, summed over
    thousands of sky pixels, drove a whole GPU run dark. ReLU is the default because it reaches
    exactly zero: softplus left a positive floor over the sky of the 2026-11-24 CPU model, which
    added flux and inflated the half-light radii of its galaxies.
    """
    if output not in OUTPUTS:
        raise VQVAEInputError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "linear":
        return x
    return _Positive.apply(x, float(leak), output)


class Decoder(nn.Module):
    """Latents [B, embed_dim, S/4, S/4] -> pre-activation image [B, 1, S, S].

    ``padding_mode`` (``"zeros"`` or ``"replicate"``) is that of every convolution: zeros make
    the edge pixels see a dark border, so that a map of one repeated code decodes to an image
    with a frame; with replicate padding it decodes to a constant image (``"transpose"``
    upsampling pads with zeros only, see `upsample2`). ``refine`` > 0 ends it with ReLU and a
    3x3 convolution from that many channels at full resolution (`VQVAE`'s ``decoder_refine``).
    """

    def __init__(self, hidden=128, res_blocks=2, res_hidden=32, embed_dim=64, upsample="bilinear",
                 output="relu", padding_mode="zeros", refine=0):
        super().__init__()
        layers = [
            nn.Conv2d(embed_dim, hidden, 3, padding=1, padding_mode=padding_mode),
            ResidualStack(hidden, res_hidden, res_blocks, padding_mode),
            upsample2(hidden, hidden // 2, upsample, padding_mode),  # S/4 -> S/2
            nn.ReLU(),
            upsample2(hidden // 2, refine or 1, upsample, padding_mode),  # S/2 -> S
        ]
        if refine:  # a nonlinear layer at full resolution (see VQVAE's ``decoder_refine``)
            layers += [nn.ReLU(), nn.Conv2d(refine, 1, 3, padding=1, padding_mode=padding_mode)]
        self.net = nn.Sequential(*layers)
        last = self.net[-1]
        last = last[-1] if isinstance(last, nn.Sequential) else last
        # Start near an empty sky: softplus(-4) = 0.018 image_scale; relu(0) = 0.
        nn.init.constant_(last.bias, -4.0 if output == "softplus" else 0.0)

    def forward(self, z):
        return self.net(z)


# Constructor keys added after models were saved, with the value that those older models have
LEGACY_CONFIG = {"output": "softplus",       # before 2026-11-24
                 "decoder_padding": "zeros",  # before 2026-12-07
                 "encoder_padding": "zeros",  # before 2026-12-07
                 "decoder_refine": 0}         # before 2026-12-08


def legacy_config(config):
    """A saved model ``config`` completed with `LEGACY_CONFIG` for the keys it lacks."""
    return {**LEGACY_CONFIG, **config}


class VQVAE(nn.Module):
    """A VQ-VAE of single-band galaxy stamps in physical pixel units.

    Parameters:
        stamp_size:         Stamp side S in pixels, a multiple of 4. [default: 84]
        hidden:             Channels of the encoder/decoder trunk. [default: 128]
        res_blocks:         Residual blocks in each residual stack. [default: 2]
        res_hidden:         Channels inside a residual block. [default: 32]
        embed_dim:          Code vector dimension D. [default: 64]
        num_codes:          Codebook size K. [default: 512]
        image_scale:        Pixel value mapped to 1 inside the network (the training loop picks
                            the median peak pixel of the training stamps). [default: 1.0]
        beta:               Commitment loss weight. [default: 0.25]
        decay:              Codebook EMA decay. [default: 0.99]
        kmeans_iters:       Lloyd iterations of the codebook initialisation. [default: 10]
        restart_every:      Dead-code window in updates (0: never restart). [default: 100]
        restart_threshold:  Uses per window below which a code is dead. [default: 1.0]
        seed:               Seed of the quantizer's k-means and restart draws. [default: 0]
        upsample:           Decoder upsampling: ``"bilinear"`` or ``"nearest"`` (x2 resize + 3x3
                            conv) or ``"transpose"`` (4x4 stride-2 transposed conv, which leaves a
                            checkerboard in the frequencies the PSF removes). [default: "bilinear"]
        normalize_latents:  Put each encoder output vector on the unit sphere (as in improved
                            VQGAN, Yu et al. 2021). It bounds the commitment loss: without it the
                            latents' scale drifts during the autoencoder warm-up and the commitment
                            term blew training up on a GPU run. [default: True]
        output:             The decoder's output, ``"relu"`` (non-negative, reaches exactly zero
                            over the sky), ``"linear"`` (unconstrained: unbiased where the
                            galaxy's wings are below the noise, at the price of small negative
                            pixels) or ``"softplus"`` (models made before 2026-11-24; a model
                            config without this key means softplus, see `from_config`).
                            [default: "relu"]
        decoder_padding:    Padding of the decoder's convolutions: ``"zeros"`` (the dark
                            border lets the decoder keep the stamp's edges dark; a model config
                            without this key means zeros, see `from_config`) or ``"replicate"``
                            (the edge pixels repeated outwards: a map of one repeated code
                            decodes to a constant image, but trained decoders leave more light
                            along the edges, `docs/default_model.md`). ``upsample="transpose"``
                            needs zeros. [default: "zeros"]
        encoder_padding:    Padding of the encoder's convolutions: ``"replicate"`` (the sky along
                            the stamp's sides is encoded like the interior's) or ``"zeros"``
                            (models made before 2026-12-07, which give each side of the map sky
                            codes of its own; a config without this key means zeros).
                            [default: "replicate"]
        decoder_refine:     Channels of a 3x3 convolution and ReLU at full resolution before the
                            decoder's output (0: none, the output is one 3x3 convolution of the
                            bilinearly upsampled S/2 features, as in models made before
                            2026-12-08; a config without this key means 0). Without it a
                            compact core can only be sharpened with negative side lobes, which
                            the non-negative output clips to dark rings (`docs/default_model.md`).
                            [default: 32]
    """

    def __init__(self, stamp_size=84, hidden=128, res_blocks=2, res_hidden=32, embed_dim=64,
                 num_codes=512, image_scale=1.0, beta=0.25, decay=0.99, kmeans_iters=10,
                 restart_every=100, restart_threshold=1.0, seed=0, upsample="bilinear",
                 normalize_latents=True, output="relu", decoder_padding="zeros",
                 encoder_padding="replicate", decoder_refine=32):
        super().__init__()
        if stamp_size < 8 or stamp_size % 4:
            raise VQVAEInputError(f"stamp_size must be a multiple of 4 and >= 8, got {stamp_size}")
        if hidden < 2 or hidden % 2:
            raise VQVAEInputError(f"hidden must be an even number >= 2, got {hidden}")
        if not image_scale > 0:
            raise VQVAEInputError(f"image_scale must be > 0, got {image_scale}")
        if output not in OUTPUTS:
            raise VQVAEInputError(f"output must be one of {OUTPUTS}, got {output!r}")
        for key, value in (("decoder_padding", decoder_padding),
                           ("encoder_padding", encoder_padding)):
            if value not in PADDINGS:
                raise VQVAEInputError(f"{key} must be one of {PADDINGS}, got {value!r}")
        if isinstance(decoder_refine, bool) or not isinstance(decoder_refine, int) \
                or decoder_refine < 0:
            raise VQVAEInputError(f"decoder_refine must be an integer >= 0, got {decoder_refine!r}")
        self._config = dict(stamp_size=int(stamp_size), hidden=int(hidden),
                            res_blocks=int(res_blocks), res_hidden=int(res_hidden),
                            embed_dim=int(embed_dim), num_codes=int(num_codes),
                            image_scale=float(image_scale), beta=float(beta), decay=float(decay),
                            kmeans_iters=int(kmeans_iters), restart_every=int(restart_every),
                            restart_threshold=float(restart_threshold), seed=int(seed),
                            upsample=str(upsample), normalize_latents=bool(normalize_latents),
                            output=str(output), decoder_padding=str(decoder_padding),
                            encoder_padding=str(encoder_padding),
                            decoder_refine=int(decoder_refine))
        self.stamp_size = int(stamp_size)
        self.image_scale = float(image_scale)
        self.normalize_latents = bool(normalize_latents)
        self.output = str(output)
        self.encoder = Encoder(hidden, res_blocks, res_hidden, embed_dim, encoder_padding)
        self.quantizer = VectorQuantizer(num_codes, embed_dim, beta=beta, decay=decay,
                                         kmeans_iters=kmeans_iters, restart_every=restart_every,
                                         restart_threshold=restart_threshold, seed=seed)
        self.decoder = Decoder(hidden, res_blocks, res_hidden, embed_dim, upsample, output,
                               decoder_padding, decoder_refine)

    @classmethod
    def from_config(cls, config):
        """Rebuild a model from a saved `config`; a key the config lacks takes the value that
        models made before it existed had (`LEGACY_CONFIG`)."""
        return cls(**legacy_config(config))

    @property
    def config(self):
        """The constructor keyword arguments: ``VQVAE(**model.config)`` rebuilds the model."""
        return dict(self._config)

    @property
    def latent_size(self):
        """Side of the code map, ``stamp_size // 4``."""
        return self.stamp_size // 4

    @property
    def num_codes(self):
        return self.quantizer.num_codes

    def _check(self, x):
        s = self.stamp_size
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != s or x.shape[3] != s:
            raise VQVAEInputError(f"expected images of shape [B, 1, {s}, {s}], got {list(x.shape)}")

    def encode(self, x):
        """Images [B, 1, S, S] in pixel units -> encoder outputs z_e [B, D, S/4, S/4]."""
        self._check(x)
        z = self.encoder(x / self.image_scale)
        return F.normalize(z.float(), dim=1) if self.normalize_latents else z

    def decode(self, z_q):
        """Latents [B, D, S/4, S/4] -> pre-PSF images [B, 1, S, S] >= 0 in pixel units (float32)."""
        return positive(self.decoder(z_q).float(), output=self.output) * self.image_scale

    def decode_codes(self, codes):
        """Code maps [B, S/4, S/4] int64 -> pre-PSF images [B, 1, S, S]."""
        return self.decode(self.quantizer.embed(codes))

    def encode_codes(self, x):
        """Images [B, 1, S, S] -> code maps [B, S/4, S/4] int64 (no codebook update)."""
        z = self.encode(x).float()
        b, d, h, w = z.shape
        index, _ = ops.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, d), self.quantizer.codebook)
        return index.reshape(b, h, w)

    def forward(self, x):
        """Encode, quantize and decode ``x`` [B, 1, S, S].

        Returns:
            (decoded pre-PSF image [B, 1, S, S], `QuantizerOutput`).
        """
        out = self.quantizer(self.encode(x))
        return self.decode(out.z_q), out

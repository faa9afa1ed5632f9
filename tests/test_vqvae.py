"""The VQ-VAE and its EMA vector quantizer: shapes, units, gradients, codebook updates."""

import re

import numpy as np
import pytest
import torch

from galsim_vqvae.nn.quantizer import VectorQuantizer
from galsim_vqvae.nn.vqvae import VQVAE, positive

SMALL = dict(stamp_size=32, hidden=16, res_blocks=1, res_hidden=8, embed_dim=8, num_codes=32)



pytestmark = pytest.mark.usefixtures("one_thread")

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_shapes_default_and_small():
    for cfg, latent in ((dict(), 21), (SMALL, 8)):
        torch.manual_seed(0)
        m = VQVAE(**cfg)
        s = m.stamp_size
        x = torch.rand(3, 1, s, s, generator=_gen(1))
        z = m.encode(x)
        assert z.shape == (3, m.config["embed_dim"], latent, latent)
        img, q = m(x)
        assert img.shape == (3, 1, s, s) and img.dtype == torch.float32
        assert q.codes.shape == (3, latent, latent) and q.codes.dtype == torch.int64
        assert q.z_q.shape == z.shape
        assert m.latent_size == latent
        codes = m.encode_codes(x)
        assert torch.equal(codes, q.codes)
        assert m.decode_codes(codes).shape == (3, 1, s, s)
    with pytest.raises(ValueError, match="shape"):
        m.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        VQVAE(stamp_size=30)


def test_config_rebuilds_model():
    m = VQVAE(**SMALL, image_scale=3.5, upsample="transpose", decoder_padding="zeros")
    m2 = VQVAE(**m.config)
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())
    x = torch.rand(2, 1, 32, 32, generator=_gen(2))
    m.eval(), m2.eval()
    torch.testing.assert_close(m(x)[0], m2(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest", "transpose"])
def test_decoder_output_non_negative(upsample):
    torch.manual_seed(3)
    m = VQVAE(**SMALL, upsample=upsample, image_scale=7.0,
              decoder_padding="zeros" if upsample == "transpose" else "replicate")
    z = 50.0 * torch.randn(4, 8, 8, 8, generator=_gen(4))  # wild latents, both signs
    out = m.decode(z)
    assert (out >= 0).all() and torch.isfinite(out).all()
    assert out.max() > 0


def test_positive_is_softplus_with_a_one_sided_leak():
    x = (30 * torch.randn(200, generator=_gen(40), dtype=torch.float64)).requires_grad_()
    g = torch.randn(200, generator=_gen(41), dtype=torch.float64)
    y = positive(x, leak=0.01, output="softplus")
    assert torch.equal(y, torch.nn.functional.softplus(x))  # exactly, in value
    y.backward(g)
    expected = g * torch.sigmoid(x.detach()) + 0.01 * g.clamp(max=0)
    torch.testing.assert_close(x.grad, expected)
    deep = x.detach() < -20
    # In the flat tail: a way back up where the loss wants more light ...
    assert (x.grad[deep & (g < 0)] <= 0.01 * g[deep & (g < 0)] + 1e-12).all()
    # ... and no push further down over the empty sky (the drift that darkened a GPU run).
    assert (x.grad[deep & (g > 0)].abs() < 1e-8).all()


def test_positive_relu_reaches_zero_with_a_one_sided_leak():
    x = (3 * torch.randn(300, generator=_gen(42), dtype=torch.float64)).requires_grad_()
    g = torch.randn(300, generator=_gen(43), dtype=torch.float64)
    y = positive(x, leak=0.01)  # relu is the default
    assert torch.equal(y, torch.relu(x))
    assert (y == 0).sum() > 100  # exactly zero over the sky, not a floor
    y.backward(g)
    on = x.detach() > 0
    torch.testing.assert_close(x.grad, g * on + 0.01 * g.clamp(max=0))
    assert (x.grad[~on & (g > 0)] == 0).all()  # no push further down where it is dark
    assert (x.grad[~on & (g < 0)] < 0).all()   # a way back up where more light is wanted


def test_output_kind_round_trips_and_legacy_configs_mean_softplus():
    m = VQVAE(**SMALL)
    assert m.config["output"] == "relu"
    legacy = {k: v for k, v in m.config.items() if k != "output"}
    assert VQVAE.from_config(legacy).output == "softplus"
    assert VQVAE.from_config(m.config).output == "relu"
    with pytest.raises(ValueError, match="output"):
        VQVAE(**SMALL, output="exp")
    z = torch.randn(2, 8, 8, 8, generator=_gen(44))
    soft = VQVAE.from_config(legacy).eval()
    soft.load_state_dict(m.state_dict())
    with torch.no_grad():
        pre = m.eval().decoder(z)
        assert torch.equal(m.decode(z), torch.relu(pre) * m.image_scale)
        assert torch.equal(soft.decode(z), torch.nn.functional.softplus(pre) * m.image_scale)


def test_works_in_physical_units():
    """A model with image_scale=a sees x as a model with scale 1 sees x/a; outputs scale by a."""
    torch.manual_seed(5)
    a = VQVAE(**SMALL, image_scale=1.0).eval()
    b = VQVAE(**SMALL, image_scale=250.0).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 32, 32, generator=_gen(6))
    torch.testing.assert_close(b.encode(250.0 * x), a.encode(x), rtol=1e-5, atol=1e-6)
    z = torch.randn(2, 8, 8, 8, generator=_gen(7))
    torch.testing.assert_close(b.decode(z), 250.0 * a.decode(z), rtol=1e-5, atol=1e-6)


def test_straight_through_gradient_is_identity():
    q = VectorQuantizer(num_codes=16, embed_dim=4, kmeans_iters=3)
    z_e = torch.randn(2, 4, 5, 5, generator=_gen(8), requires_grad=True)
    out = q(z_e)
    g = torch.randn(out.z_q.shape, generator=_gen(9))
    (out.z_q * g).sum().backward()
    torch.testing.assert_close(z_e.grad, g, rtol=0, atol=0)
    # the commitment loss pulls z_e towards its (fixed) code: d/dz beta*mean((z-q)^2)
    z_e.grad = None
    out = q.eval()(z_e)
    out.commitment_loss.backward()
    code_vectors = q.codebook[out.codes].permute(0, 3, 1, 2)
    expected = 2 * q.beta * (z_e.detach() - code_vectors) / z_e.numel()
    torch.testing.assert_close(z_e.grad, expected, rtol=1e-5, atol=1e-7)
    # forward values of z_q are the code vectors
    torch.testing.assert_close(out.z_q.detach(), code_vectors, rtol=0, atol=1e-6)


def test_ema_update_matches_float64_reference():
    k, d = 12, 5
    q = VectorQuantizer(num_codes=k, embed_dim=d, decay=0.9, eps=1e-3, kmeans_iters=0,
                        restart_every=0)
    rng = np.random.default_rng(11)
    codebook = rng.normal(size=(k, d))
    count = rng.uniform(0.5, 5.0, size=k)
    ema_sum = codebook * count[:, None] + 0.1 * rng.normal(size=(k, d))
    q.codebook.copy_(torch.tensor(codebook))
    q.ema_count.copy_(torch.tensor(count))
    q.ema_sum.copy_(torch.tensor(ema_sum))
    z_e = rng.normal(size=(3, d, 4, 4)) * 1.3
    out = q.train()(torch.tensor(z_e, dtype=torch.float32))

    z = z_e.transpose(0, 2, 3, 1).reshape(-1, d)
    dist = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
    codes = dist.argmin(1)
    assert np.array_equal(out.codes.reshape(-1).numpy(), codes)
    batch_count = np.bincount(codes, minlength=k).astype(np.float64)
    batch_sum = np.zeros((k, d))
    np.add.at(batch_sum, codes, z)
    new_count = 0.9 * count + 0.1 * batch_count
    new_sum = 0.9 * ema_sum + 0.1 * batch_sum
    n = new_count.sum()
    smoothed = (new_count + 1e-3) / (n + k * 1e-3) * n
    np.testing.assert_allclose(q.ema_count.numpy(), new_count, rtol=1e-5)
    np.testing.assert_allclose(q.ema_sum.numpy(), new_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.codebook.numpy(), new_sum / smoothed[:, None], rtol=1e-5,
                               atol=1e-6)
    p = batch_count / batch_count.sum()
    p = p[p > 0]
    np.testing.assert_allclose(out.perplexity.item(), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    np.testing.assert_allclose(out.usage.item(), (batch_count > 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(out.commitment_loss.item(),
                               0.25 * ((z - codebook[codes]) ** 2).mean(), rtol=1e-5)
    # eval mode leaves the codebook alone
    before = q.codebook.clone()
    q.eval()(torch.tensor(z_e, dtype=torch.float32))
    assert torch.equal(before, q.codebook)


def _blobs(n, d, centres, seed):
    g = _gen(seed)
    c = torch.randn(centres, d, generator=g) * 4.0
    pick = torch.randint(centres, (n,), generator=g)
    return c[pick] + 0.3 * torch.randn(n, d, generator=g)


def _quant_error(q, z):
    codes = torch.cdist(z, q.codebook).argmin(1)
    return ((z - q.codebook[codes]) ** 2).sum(1).mean().item()


def test_kmeans_init_reduces_quantisation_error():
    z = _blobs(3000, 6, centres=40, seed=12)
    errors = []
    for iters in (1, 10):
        q = VectorQuantizer(num_codes=32, embed_dim=6, kmeans_iters=iters, seed=1)
        q.kmeans_init(z)
        errors.append(_quant_error(q, z))
    random_rows = VectorQuantizer(num_codes=32, embed_dim=6, kmeans_iters=1, seed=1)
    # zero Lloyd iterations: just the random starting rows
    g = random_rows._generator(z.device, 0)
    random_rows.codebook.copy_(z[torch.randperm(len(z), generator=g)[:32]])
    start = _quant_error(random_rows, z)
    assert errors[0] < start and errors[1] < 0.8 * start, (start, errors)
    # the EMA state matches the clusters
    torch.testing.assert_close(q.ema_sum / q.ema_count[:, None], q.codebook)
    assert bool(q.initialized)


def test_dead_codes_are_restarted_from_recent_encoder_outputs():
    q = VectorQuantizer(num_codes=16, embed_dim=3, kmeans_iters=0, restart_every=4, seed=2)
    # eight live codes near the data, eight far away that no vector ever picks
    codebook = torch.randn(16, 3, generator=_gen(13))
    codebook[8:] += 1000.0
    q.codebook.copy_(codebook)
    q.ema_sum.copy_(codebook)
    z = torch.randn(2, 3, 6, 6, generator=_gen(14))
    for _ in range(3):
        out = q.train()(z)
    assert torch.equal(q.codebook[8:], codebook[8:] * 1.0) or (q.codebook[8:] > 100).all()
    assert q.restarted.item() == 0
    out = q(z)  # the 4th update ends the window
    rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
    dead_now = q.codebook[8:]
    dist = torch.cdist(dead_now, rows).min(1).values
    assert (dist < 1e-6).all()  # each dead code became one of this batch's vectors
    assert q.restarted.item() >= 8
    assert out.usage.item() <= 0.5
    assert q(z).usage.item() > 0.5  # revived codes are picked


def test_batch_statistics_can_be_reduced_across_ranks():
    """Two half-batches' statistics summed (an all-reduce) give the full batch's update."""
    torch.manual_seed(15)
    z = torch.randn(4, 6, 5, 5, generator=_gen(16))
    full = VectorQuantizer(num_codes=10, embed_dim=6, kmeans_iters=0, restart_every=0)
    ranks = VectorQuantizer(num_codes=10, embed_dim=6, kmeans_iters=0, restart_every=0)
    ranks.load_state_dict(full.state_dict())
    full.train()(z)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 6)  # noqa: E731
    parts = []
    for half in (z[:2], z[2:]):
        codes = torch.cdist(flat(half), ranks.codebook).argmin(1)
        parts.append(ranks.batch_statistics(flat(half), codes))
    ranks.apply_statistics({k: parts[0][k] + parts[1][k] for k in ("count", "sum")})
    for name in ("codebook", "ema_count", "ema_sum", "updates"):
        torch.testing.assert_close(getattr(ranks, name), getattr(full, name), rtol=1e-5, atol=1e-6)


def test_state_dict_holds_quantizer_state():
    q = VectorQuantizer(num_codes=8, embed_dim=2, kmeans_iters=2, restart_every=3)
    for s in range(5):
        q.train()(torch.randn(1, 2, 4, 4, generator=_gen(20 + s)))
    state = q.state_dict()
    for k in ("codebook", "ema_count", "ema_sum", "window_count", "updates", "initialized"):
        assert k in state
    q2 = VectorQuantizer(num_codes=8, embed_dim=2, kmeans_iters=2, restart_every=3)
    q2.load_state_dict(state)
    assert q2._updates == 5 and q2._initialized
    z = torch.randn(1, 2, 4, 4, generator=_gen(30))
    q(z), q2(z)  # the 6th update restarts in both, identically
    assert torch.equal(q.codebook, q2.codebook)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_replicate_padding_decodes_one_repeated_code_to_a_constant_image(upsample):
    """A map of one code decodes to a constant image with replicate padding, for random weights;
    zero padding gives the same value inside and a frame along the edges."""
    torch.manual_seed(12)
    rep = VQVAE(**SMALL, upsample=upsample, output="linear", decoder_padding="replicate").eval()
    zero = VQVAE(**{**rep.config, "decoder_padding": "zeros"}).eval()
    zero.load_state_dict(rep.state_dict())  # the same weights, the same parameter names
    n = 16  # latent side: the zero-padded decoder's edge effects stay within 5 latent pixels
    z = torch.randn(3, 8, 1, 1, generator=_gen(13)).expand(3, 8, n, n)
    with torch.no_grad():
        a, b = rep.decode(z), zero.decode(z)
    scale = a.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(a, a[..., :1, :1].expand_as(a), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(b[..., 20:-20, 20:-20], a[..., 20:-20, 20:-20], rtol=0,
                               atol=1e-5 * scale)
    assert (b - a).abs().max() > 1e-2 * scale  # the frame


def test_replicate_padding_encodes_a_flat_stamp_to_one_latent():
    """With replicate padding a flat stamp (the empty sky) gives the same latent vector at every
    position of the map, the sides included, for random weights; with zero padding the sides
    differ from the interior (and so get codes of their own)."""
    torch.manual_seed(14)
    rep = VQVAE(**{**SMALL, "stamp_size": 64}).eval()  # a 16 x 16 map
    assert rep.config["encoder_padding"] == "replicate"  # the default of new models
    zero = VQVAE(**{**rep.config, "encoder_padding": "zeros"}).eval()
    zero.load_state_dict(rep.state_dict())
    level = float(torch.rand(1, generator=_gen(15))) + 0.1
    x = torch.full((2, 1, 64, 64), level)
    with torch.no_grad():
        a, b = rep.encode(x), zero.encode(x)
    torch.testing.assert_close(a, a[..., :1, :1].expand_as(a), rtol=0, atol=1e-5)
    torch.testing.assert_close(b[..., 5:-5, 5:-5], a[..., 5:-5, 5:-5], rtol=0, atol=1e-5)
    assert (b - a).abs().amax(dim=1)[..., 0, :].min() > 1e-3  # every cell of the first row


def test_padding_legacy_configs_mean_zeros_and_bad_values_are_refused():
    new = VQVAE(**SMALL).config  # new models: replicate in the encoder, zeros in the decoder
    assert (new["encoder_padding"], new["decoder_padding"]) == ("replicate", "zeros")
    m = VQVAE(**SMALL, decoder_padding="replicate")
    legacy = {k: v for k, v in m.config.items() if k not in ("decoder_padding",
                                                             "encoder_padding")}
    old = VQVAE.from_config(legacy)
    assert old.config["decoder_padding"] == old.config["encoder_padding"] == "zeros"
    convs = [c for c in old.modules() if isinstance(c, torch.nn.Conv2d)]
    assert convs and all(c.padding_mode == "zeros" for c in convs)
    assert all(c.padding_mode == "replicate" for c in m.modules()
               if isinstance(c, torch.nn.Conv2d) and c.kernel_size != (1, 1))
    assert VQVAE.from_config(m.config).config == m.config
    for key in ("decoder_padding", "encoder_padding"):
        with pytest.raises(ValueError, match=f"{key} must be one of .* got 'reflect'"):
            VQVAE(**SMALL, **{key: "reflect"})
    with pytest.raises(ValueError, match="upsample='transpose' needs decoder_padding='zeros'"):
        VQVAE(**SMALL, upsample="transpose", decoder_padding="replicate")


def test_decoder_refine_adds_one_nonlinear_full_resolution_layer():
    """``decoder_refine=C``: the last upsampling gives C channels, then ReLU and a 3x3 conv to one
    at full resolution (32 for new models); C = 0 (and a config older than the key) is the layer
    list of before, so older bundles load into it. After the last upsampling's input the plain
    decoder is affine (so a sharp core needs negative side lobes), the refined one is not."""
    torch.manual_seed(16)
    assert VQVAE(**SMALL).config["decoder_refine"] == 32  # the default of new models
    plain = VQVAE(**SMALL, decoder_refine=0)
    legacy = {k: v for k, v in plain.config.items() if k != "decoder_refine"}
    assert VQVAE.from_config(legacy).config["decoder_refine"] == 0
    assert list(VQVAE.from_config(legacy).state_dict()) == list(plain.state_dict())
    refined = VQVAE(**SMALL, decoder_refine=6)
    tail = list(refined.decoder.net)[-3:]
    assert tail[0][-1].out_channels == 6 and isinstance(tail[1], torch.nn.ReLU)
    assert (tail[2].in_channels, tail[2].out_channels, tail[2].kernel_size) == (6, 1, (3, 3))
    assert VQVAE.from_config(refined.config).config == refined.config
    s = SMALL["stamp_size"] // 2  # what the last upsampling takes: hidden // 2 channels, S/2
    a, b = (torch.randn(2, SMALL["hidden"] // 2, s, s, generator=_gen(17 + i)) for i in range(2))
    zero = torch.zeros_like(a)
    with torch.no_grad():
        p_tail, r_tail = plain.decoder.net[4:], refined.decoder.net[4:]
        torch.testing.assert_close(p_tail(a + b), p_tail(a) + p_tail(b) - p_tail(zero),
                                   rtol=1e-4, atol=1e-5)  # affine: cannot sharpen without lobes
        out = r_tail(a + b)
        assert out.shape == (2, 1, SMALL["stamp_size"], SMALL["stamp_size"])
        assert (out - (r_tail(a) + r_tail(b) - r_tail(zero))).abs().max() > 1e-2 * out.abs().max()
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match=f"decoder_refine must be an integer >= 0, got "
                                             f"{re.escape(repr(bad))}"):
            VQVAE(**SMALL, decoder_refine=bad)


def test_shipped_model_keeps_zero_padding():
    """The shipped bundle predates the key: it loads with zero padding, the layers it was
    trained with (decoded outputs bit-identical to the code before the key, checked once)."""
    from galsim_vqvae import Emulator

    vq = Emulator.load("default").vqvae
    assert vq.config["decoder_padding"] == vq.config["encoder_padding"] == "zeros"
    assert vq.config["decoder_refine"] == 0  # nor the full-resolution layer of new models
    assert all(c.padding_mode == "zeros" for c in vq.modules() if isinstance(c, torch.nn.Conv2d))

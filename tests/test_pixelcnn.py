"""Gated PixelCNN prior: exact causal receptive field (no blind spot), conditioning, config."""

import numpy as np
import pytest
import torch

from galsim_vqvae.errors import VQVAEInputError
from galsim_vqvae.nn.pixelcnn import GatedPixelCNN


pytestmark = pytest.mark.usefixtures("one_thread")


def expected_support(height, width, layers, kernel_size, i, j):
    """Reference receptive field of output (i, j), derived from the architecture on paper.

    Walk the layers backwards. Horizontal output (r, c) of a layer needs the layer's horizontal
    input at (r, c-p .. c) ('B', which includes the residual) or (r, c-p .. c-1) ('A', first layer,
    no residual), and its vertical pre-activation at (r-1, c), i.e. the layer's vertical input at
    rows r-1-p .. r-1, columns c-p .. c+p. Vertical output (r, c) needs the vertical input at rows
    r-p .. r, columns c-p .. c+p. Positions outside the map are zero padding.
    """
    p = kernel_size // 2
    need_h = np.zeros((height, width), bool)
    need_h[i, j] = True
    need_v = np.zeros((height, width), bool)

    def box(mask, r0, r1, c0, c1):
        mask[max(r0, 0):max(min(r1, height - 1) + 1, 0), max(c0, 0):max(min(c1, width - 1) + 1, 0)] = True

    for layer in reversed(range(layers)):
        first = layer == 0
        new_h = np.zeros_like(need_h)
        new_v = np.zeros_like(need_v)
        for r, c in zip(*np.nonzero(need_h)):
            box(new_h, r, r, c - p, c - 1 if first else c)
            box(new_v, r - 1 - p, r - 1, c - p, c + p)
        for r, c in zip(*np.nonzero(need_v)):
            box(new_v, r - p, r, c - p, c + p)
        need_h, need_v = new_h, new_v
    return need_h | need_v  # both stacks start from the code embedding


def strict_past(height, width, i, j):
    mask = np.zeros((height, width), bool)
    mask[:i] = True
    mask[i, :j] = True
    return mask


def gradient_support(model, codes, positions, cond=None, class_label=None, seed=0):
    """[len(positions), H, W] bool: where d logits[b, :, i_b, j_b] / d embedding is nonzero.

    Each batch element carries one output position, so one backward pass gives all of them.
    """
    captured = {}

    def hook(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = model.embedding.register_forward_hook(hook)
    try:
        b = len(positions)
        batch = codes.expand(b, -1, -1).clone()
        logits = model(batch, cond, class_label)
        ii = torch.tensor([p[0] for p in positions])
        jj = torch.tensor([p[1] for p in positions])
        picked = logits[torch.arange(b), :, ii, jj]  # [B, K]
        gen = torch.Generator().manual_seed(seed)
        weights = torch.randn(model.num_codes, dtype=picked.dtype, generator=gen)
        (picked @ weights).sum().backward()
    finally:
        handle.remove()
    return (captured["emb"].grad.abs().sum(-1) != 0).numpy()


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return GatedPixelCNN(**kwargs).double()


def random_codes(num_codes, height, width, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_codes, (1, height, width), generator=gen)


def test_exact_receptive_field_shallow():
    """A 3-layer k=3 net on 9x11: the gradient support equals the paper-derived set exactly."""
    height, width, layers, k = 9, 11, 3, 3
    model = make_model(num_codes=7, channels=6, layers=layers, kernel_size=k)
    positions = [(i, j) for i in range(height) for j in range(width)]
    support = gradient_support(model, random_codes(7, height, width), positions)
    for b, (i, j) in enumerate(positions):
        expected = expected_support(height, width, layers, k, i, j)
        assert not (expected & ~strict_past(height, width, i, j)).any()  # reference is causal
        np.testing.assert_array_equal(support[b], expected, err_msg=f"output position {(i, j)}")
    # The shallow net does not cover the whole past, so the test above is a real restriction.
    assert (expected_support(height, width, layers, k, 8, 5)
            != strict_past(height, width, 8, 5)).any()


@pytest.mark.parametrize("kernel_size", [5, 7])
def test_exact_receptive_field_other_kernels(kernel_size):
    height, width, layers = 8, 9, 2
    model = make_model(num_codes=5, channels=4, layers=layers, kernel_size=kernel_size)
    positions = [(i, j) for i in range(height) for j in range(width)]
    support = gradient_support(model, random_codes(5, height, width), positions)
    for b, (i, j) in enumerate(positions):
        np.testing.assert_array_equal(
            support[b], expected_support(height, width, layers, kernel_size, i, j),
            err_msg=f"output position {(i, j)}")


def test_no_blind_spot_deep_21x21():
    """A deep net on 21x21 sees exactly the whole past of every tested position."""
    height = width = 21
    layers, k = 10, 5
    # The paper-derived reference says 10 layers of k=5 are the fewest that cover the full past of
    # every position (the last column of the last row needs 10 steps of 2 columns).
    assert not (expected_support(height, width, layers - 1, k, 20, 20)
                == strict_past(height, width, 20, 20)).all()
    for i in range(height):
        for j in range(width):
            np.testing.assert_array_equal(expected_support(height, width, layers, k, i, j),
                                          strict_past(height, width, i, j))
    model = make_model(num_codes=6, channels=4, layers=layers, kernel_size=k)
    positions = [(0, 0), (0, 1), (0, 20), (1, 0), (10, 10), (20, 0), (20, 20), (20, 19),
                 (15, 3), (5, 17), (2, 2), (19, 20)]
    cond_model = make_model(num_codes=6, channels=4, layers=layers, kernel_size=k, cond_dim=2,
                            num_classes=3)
    cond = torch.randn(len(positions), 2, dtype=torch.float64)
    labels = torch.arange(len(positions)) % 3
    codes = random_codes(6, height, width)
    for support in (gradient_support(model, codes, positions),
                    gradient_support(cond_model, codes, positions, cond, labels)):
        for b, (i, j) in enumerate(positions):
            np.testing.assert_array_equal(support[b], strict_past(height, width, i, j),
                                          err_msg=f"output position {(i, j)}")


def test_future_codes_do_not_change_logits():
    """Functional check: rewriting every code at and after (i, j) leaves logits[:, :, i, j]."""
    model = make_model(num_codes=9, channels=8, layers=4, kernel_size=5, cond_dim=3)
    codes = random_codes(9, 7, 6, seed=3)
    cond = torch.randn(1, 3, dtype=torch.float64)
    base = model(codes, cond)
    gen = torch.Generator().manual_seed(5)
    for i, j in [(0, 0), (3, 2), (6, 5), (2, 5)]:
        other = codes.clone().view(-1)
        flat = i * codes.shape[2] + j
        other[flat:] = torch.randint(0, 9, (other.numel() - flat,), generator=gen)
        changed = model(other.view_as(codes), cond)
        torch.testing.assert_close(changed[:, :, i, j], base[:, :, i, j], rtol=0, atol=0)
        if flat > 0:  # and the past does matter
            past = codes.clone().view(-1)
            past[flat - 1] = (past[flat - 1] + 1) % 9
            assert not torch.equal(model(past.view_as(codes), cond)[:, :, i, j],
                                   base[:, :, i, j])


def test_conditioning_changes_logits_and_is_required():
    model = make_model(num_codes=5, channels=6, layers=2, kernel_size=3, cond_dim=2,
                       num_classes=4)
    codes = random_codes(5, 4, 4).expand(2, -1, -1)
    cond = torch.randn(2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 3])
    out = model(codes, cond, labels)
    assert out.shape == (2, 5, 4, 4)
    # same codes, different labels -> different logits everywhere, including the first position
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0, :, 0, 0], out[1, :, 0, 0])
    out2 = model(codes, cond, torch.tensor([0, 0]))
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=0)
    assert not torch.allclose(out2[1], out[1])
    with pytest.raises(VQVAEInputError, match="cond"):
        model(codes, None, labels)
    with pytest.raises(VQVAEInputError, match="class_label"):
        model(codes, cond, None)
    with pytest.raises(VQVAEInputError, match=r"\[2, 2\]"):
        model(codes, torch.randn(2, 3, dtype=torch.float64), labels)
    plain = make_model(num_codes=5, channels=6, layers=2, kernel_size=3)
    with pytest.raises(VQVAEInputError, match="cond_dim=0"):
        plain(codes, cond)


def test_config_round_trip_and_state_dict():
    model = GatedPixelCNN(num_codes=11, channels=8, layers=3, kernel_size=5, cond_dim=2,
                          num_classes=3, dropout=0.25).eval()
    assert model.config == dict(num_codes=11, channels=8, layers=3, kernel_size=5, cond_dim=2,
                                num_classes=3, dropout=0.25)
    rebuilt = GatedPixelCNN(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    codes = torch.randint(0, 11, (3, 5, 6))
    cond = torch.randn(3, 2)
    labels = torch.tensor([0, 1, 2])
    torch.testing.assert_close(rebuilt(codes, cond, labels), model(codes, cond, labels),
                               rtol=0, atol=0)
    assert GatedPixelCNN().config == dict(num_codes=512, channels=128, layers=15, kernel_size=5,
                                          cond_dim=0, num_classes=0, dropout=0.0)


def test_dropout_acts_in_training_mode_only_and_keeps_causality():
    torch.manual_seed(3)
    model = GatedPixelCNN(num_codes=7, channels=8, layers=3, kernel_size=3, dropout=0.5)
    codes = torch.randint(0, 7, (4, 5, 5))
    model.eval()
    torch.testing.assert_close(model(codes), model(codes), rtol=0, atol=0)
    plain = GatedPixelCNN(num_codes=7, channels=8, layers=3, kernel_size=3).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(codes), plain(codes), rtol=0, atol=0)  # off in eval mode
    model.train()
    torch.manual_seed(0)
    a = model(codes)
    torch.manual_seed(1)
    b = model(codes)
    assert not torch.allclose(a, b)  # on in training mode
    # changing a later code never changes an earlier position's logits, whatever the mask
    later = codes.clone()
    later[:, 2, 3] = (later[:, 2, 3] + 1) % 7
    torch.manual_seed(0)
    c = model(later)
    flat_a, flat_c = a.flatten(2), c.flatten(2)
    torch.testing.assert_close(flat_a[..., :2 * 5 + 3 + 1], flat_c[..., :2 * 5 + 3 + 1],
                               rtol=0, atol=0)
    assert not torch.allclose(flat_a[..., 2 * 5 + 4:], flat_c[..., 2 * 5 + 4:])
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(VQVAEInputError, match="dropout"):
            GatedPixelCNN(num_codes=7, dropout=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=4), "kernel_size must be odd"),
    (dict(kernel_size=1), "kernel_size"),
    (dict(layers=0), "layers"),
    (dict(num_codes=1), "num_codes"),
    (dict(channels=2.5), "channels"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(VQVAEInputError, match=match):
        GatedPixelCNN(**kwargs)


def test_bad_codes():
    model = GatedPixelCNN(num_codes=4, channels=4, layers=1, kernel_size=3)
    with pytest.raises(VQVAEInputError, match="integer tensor"):
        model(torch.zeros(2, 3, 3))
    with pytest.raises(VQVAEInputError, match="integer tensor"):
        model(torch.zeros(3, 3, dtype=torch.int64))

"""Image transforms: rotation direction and exactness, crop, resize, the per-image Gaussian blur by hand, the random shift.

Legend: N images, C channels, H/W sides.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.repro.datasets.images import center_crop, gaussian_blur, gaussian_kernels, random_shift, resize, rotate


def test_rotation_by_quarter_turns_is_exact_and_counter_clockwise():
    x = torch.rand(3, 2, 8, 8)
    assert torch.equal(rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)))      # rot90: counter-clockwise
    assert torch.equal(rotate(x, -90), torch.rot90(x, -1, dims=(2, 3)))
    y = torch.rand(1, 1, 6, 10)                                             # non-square: 180° = both flips
    assert torch.equal(rotate(y, 180), y.flip(2).flip(3))
    assert torch.equal(rotate(x, 0), x)


def test_rotation_by_30_degrees_moves_a_point_on_the_circle():
    # one bright pixel right of the centre of a 41x41 image; 30° counter-clockwise moves it up and left
    x = torch.zeros(1, 1, 41, 41)
    x[0, 0, 20, 30] = 1.0                       # row 20 = centre row, 10 px right of the centre
    r = rotate(x, 30)
    row, col = divmod(int(r.flatten().argmax()), 41)
    assert (row, col) == (20 - round(10 * math.sin(math.radians(30))), 20 + round(10 * math.cos(math.radians(30))))
    assert rotate(torch.ones(1, 1, 9, 9), 45)[0, 0, 0, 0] == 0               # corners uncovered: filled with 0


def test_crop_and_resize():
    x = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28)
    c = center_crop(x, 21)
    assert c.shape == (1, 1, 21, 21) and c[0, 0, 0, 0] == x[0, 0, 4, 4]     # torchvision rounds (28-21)/2 up
    assert resize(torch.ones(2, 1, 21, 21), 16).shape == (2, 1, 16, 16)
    torch.testing.assert_close(resize(torch.full((1, 1, 21, 21), 3.0), 16), torch.full((1, 1, 16, 16), 3.0))
    with pytest.raises(ValueError, match="size"):
        center_crop(x, 29)


def test_gaussian_blur_by_hand():
    k = gaussian_kernels(torch.tensor([1.0]), 3)[0]
    e = math.exp(-0.5)
    torch.testing.assert_close(k, torch.tensor([e, 1.0, e]) / (1 + 2 * e))
    # a delta in the middle of an 9x9 image becomes the outer product of the two 1-D kernels
    x = torch.zeros(2, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    sig = torch.tensor([0.8, 1.5])
    y = gaussian_blur(x, sig, (3, 5))
    for n in range(2):
        kx, ky = gaussian_kernels(sig[n:n + 1], 3)[0], gaussian_kernels(sig[n:n + 1], 5)[0]
        torch.testing.assert_close(y[n, 0, 2:7, 3:6], ky[:, None] * kx[None, :])
        assert y[n].sum().item() == pytest.approx(1.0, abs=1e-6)
    # reflect padding: a constant image stays constant; a ramp is blurred like F.conv2d with reflect padding
    torch.testing.assert_close(gaussian_blur(torch.full((1, 1, 6, 6), 2.0), torch.tensor([1.3])),
                               torch.full((1, 1, 6, 6), 2.0))
    ramp = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)
    kx, ky = gaussian_kernels(torch.tensor([1.1]), 3)[0], gaussian_kernels(torch.tensor([1.1]), 7)[0]
    ref = F.conv2d(F.pad(ramp, (1, 1, 3, 3), mode="reflect"), (ky[:, None] * kx[None, :])[None, None])
    torch.testing.assert_close(gaussian_blur(ramp, torch.tensor([1.1]), (3, 7)), ref)
    with pytest.raises(ValueError, match="sigma_N"):
        gaussian_blur(x, torch.tensor([1.0]))


def test_random_shift_by_one_moves_pixels_and_fills_background():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = random_shift(x, 1, g, fill=-1.0)
    assert y.shape == x.shape
    for b in range(2):
        # every output is x shifted by (dr, dc) ∈ {-1, 0, 1}², uncovered pixels = fill
        ok = False
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                pad = torch.nn.functional.pad(x[b], (1, 1, 1, 1), value=-1.0)
                ok |= torch.equal(pad[:, 1 + dr:5 + dr, 1 + dc:5 + dc], y[b])
        assert ok


def test_random_shift_is_a_translated_copy_drawn_from_the_generator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 9, 9)
    assert random_shift(x, 0, g, -1.0) is x
    y = random_shift(x, 2, g, -5.0)
    assert y.shape == x.shape
    for b in range(6):           # each image is a translated copy: find its offset, check content and fill
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.full((9, 9), -5.0)
                ref[max(dy, 0):9 + min(dy, 0), max(dx, 0):9 + min(dx, 0)] = \
                    x[b, 0, max(-dy, 0):9 - max(dy, 0), max(-dx, 0):9 - max(dx, 0)]
                found = found or torch.equal(y[b, 0], ref)
        assert found, b
    same = random_shift(x, 2, torch.Generator().manual_seed(0), -5.0)
    assert torch.equal(same, y)                                  # offsets come from the generator only
    assert not torch.equal(random_shift(x, 2, torch.Generator().manual_seed(1), -5.0), y)

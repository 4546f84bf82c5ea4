"""MIC's block mask (hrda_mic.md 4.2, Q16) against an independent computation of the reference's mask."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dida.constants import IMG_MEAN, IMG_STD
from dida.uda.masking import block_grid_size, block_mask, mask_image


def _reference_mask(seed: int, batch: int, height: int, width: int, block: int, ratio: float) -> torch.Tensor:
    """The reference's mask after ``torch.manual_seed(seed)`` on the CPU, computed from the spec.

    Grid ``round(H / b) x round(W / b)`` (Python round), ``u = torch.rand`` of the grid's shape from the
    global RNG, keep = ``u > ratio``, nearest upsampling: output pixel ``i`` reads grid cell
    ``min(floor(i * (g / H)), g - 1)`` with the scale and product in float32 (PyTorch's nearest rule).
    """
    gh, gw = round(height / block), round(width / block)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    u = torch.rand(batch, 1, gh, gw)
    torch.set_rng_state(state)
    grid = (u > ratio).float().numpy()

    def index(out: int, grid_size: int) -> np.ndarray:
        scale = np.float32(grid_size) / np.float32(out)
        src = np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, grid_size - 1)

    rows, cols = index(height, gh), index(width, gw)
    return torch.from_numpy(grid[:, :, rows][:, :, :, cols].copy())


@pytest.mark.parametrize("seed, shape, block, ratio", [
    (0, (2, 3, 64, 64), 8, 0.7),
    (3, (2, 3, 512, 512), 32, 0.7),
    (5, (1, 3, 100, 70), 32, 0.5),  # non-divisible: uneven blocks
    (7, (3, 3, 97, 131), 16, 0.3),
])
def test_mask_equals_the_references(seed, shape, block, ratio):
    mask = block_mask(shape, block, ratio, torch.Generator().manual_seed(seed))
    ref = _reference_mask(seed, shape[0], shape[2], shape[3], block, ratio)
    assert mask.shape == (shape[0], 1, shape[2], shape[3]) and mask.dtype == torch.float32
    assert torch.equal(mask, ref)


def test_masked_image_equals_the_references_and_is_the_mean_colour():
    g = torch.Generator().manual_seed(11)
    img = torch.randn(2, 3, 64, 48, generator=g)
    before = img.clone()
    mask = block_mask(img.shape, 16, 0.7, torch.Generator().manual_seed(4))
    out = mask_image(img, mask)
    ref = img * _reference_mask(4, 2, 64, 48, 16, 0.7)  # x * M, broadcast over channels
    assert torch.equal(out, ref) and torch.equal(img, before)
    masked = mask[:, 0] == 0
    assert masked.any() and (~masked).any()
    rgb = out.permute(0, 2, 3, 1) * torch.tensor(IMG_STD) + torch.tensor(IMG_MEAN)
    assert torch.allclose(rgb[masked], torch.tensor(IMG_MEAN).expand(int(masked.sum()), 3))


def test_uneven_blocks_hand_checked():
    # H = 100, b = 32: round(3.125) = 3 cells; rows 0-33 read cell 0 (33 * 0.03 < 1), 34-66 cell 1, 67-99 cell 2.
    assert block_grid_size(100, 100, 32) == (3, 3)
    gen = torch.Generator().manual_seed(0)
    mask = block_mask((64, 3, 100, 32), 32, 0.5, gen)[:, 0, :, 0]  # many images: every pattern occurs
    starts = [0, 34, 67, 100]
    for a, b in itertools.pairwise(starts):
        assert torch.equal(mask[:, a:b], mask[:, a:a + 1].expand(-1, b - a))
    for a in starts[1:-1]:
        assert not torch.equal(mask[:, a - 1], mask[:, a])  # a new cell starts here
    # Python's round sends halves to even: 80 / 32 = 2.5 -> 2 cells of 40 px, 48 / 32 = 1.5 -> 2 cells of 24.
    assert block_grid_size(80, 48, 32) == (2, 2)


def test_reproducible_and_ratio_extremes():
    shape = (2, 3, 32, 32)
    a = block_mask(shape, 8, 0.7, torch.Generator().manual_seed(9))
    b = block_mask(shape, 8, 0.7, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert block_mask(shape, 8, 1.0, torch.Generator()).sum() == 0  # u > 1 never holds
    big = block_mask((64, 3, 64, 64), 8, 0.7, torch.Generator().manual_seed(1))
    assert abs(big.mean().item() - 0.3) < 0.03  # a block is kept with probability 1 - ratio


def test_device_argument_and_bad_sizes():
    mask = block_mask((1, 3, 16, 16), 4, 0.5, torch.Generator().manual_seed(0), device="cpu")
    assert mask.device.type == "cpu"
    with pytest.raises(ValueError, match="no whole"):
        block_mask((1, 3, 10, 64), 32, 0.5, torch.Generator())  # round(10 / 32) = 0
    with pytest.raises(ValueError, match="does not fit"):
        mask_image(torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 4))


@pytest.mark.gpu
def test_mask_on_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(2)
    cpu = block_mask((2, 3, 100, 70), 32, 0.7, torch.Generator().manual_seed(2))
    cuda = block_mask((2, 3, 100, 70), 32, 0.7, gen, device="cuda")
    assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)
    img = torch.randn(2, 3, 100, 70, device="cuda")
    assert torch.equal(mask_image(img, cpu), img * cuda)


def test_every_size_up_to_200_matches_the_independent_rule():
    for block in (16, 32, 64):
        for side in range(block // 2 + 1, 201, 3):
            mask = block_mask((1, 3, side, block), block, 0.5, torch.Generator().manual_seed(side))
            assert torch.equal(mask, _reference_mask(side, 1, side, block, block, 0.5)), (side, block)

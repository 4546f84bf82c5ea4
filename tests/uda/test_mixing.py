from __future__ import annotations

import math

import torch

from dida.uda.mixing import class_mix_masks, mix, mix_batch


def _labels():
    a = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 1, 1]])
    b = torch.tensor([[3, 3, 3, 3], [4, 4, 0, 0], [4, 4, 0, 0]])
    return torch.stack([a, b])


def _picked(mask, labels, b):
    return set(labels[b][mask[b]].unique().tolist())


def test_batch_union_default_picks_half_of_union_including_ignore():
    labels = _labels()
    union = set(labels.unique().tolist())  # {0,1,2,3,4,255}: 6 values -> pick 3
    for seed in range(20):
        mask = class_mix_masks(labels, torch.Generator().manual_seed(seed))
        assert mask.dtype == torch.bool and mask.shape == labels.shape
        for b in range(2):
            picked = _picked(mask, labels, b)
            assert picked <= union
            # every pixel of a picked class is pasted
            for c in picked:
                assert mask[b][labels[b] == c].all()
    # picked set sizes: exactly ceil(6/2)=3 over the union; image 1 contains only some of them.
    counts = []
    for seed in range(200):
        mask = class_mix_masks(labels, torch.Generator().manual_seed(seed))
        counts.append(len(_picked(mask, labels, 0)))
    assert max(counts) == 3 and min(counts) <= 1  # sometimes picks classes image 0 lacks
    seen_255 = any(
        bool(class_mix_masks(labels, torch.Generator().manual_seed(s))[0][labels[0] == 255].all())
        for s in range(50)
    )
    assert seen_255


def test_per_image_option_excludes_ignore_and_picks_half_of_own():
    labels = _labels()
    for seed in range(30):
        mask = class_mix_masks(labels, torch.Generator().manual_seed(seed), per_image=True)
        assert not mask[0][labels[0] == 255].any()
        own0 = {0, 1, 2}
        own1 = {0, 3, 4}
        assert len(_picked(mask, labels, 0)) == math.ceil(len(own0) / 2)
        assert len(_picked(mask, labels, 1)) == math.ceil(len(own1) / 2)


def test_uniform_choice_frequencies():
    labels = torch.tensor([[[0, 1, 2, 3]]])  # 4 classes -> pick 2
    hits = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    n = 2000
    for _ in range(n):
        hits += class_mix_masks(labels, g)[0, 0].float()
    freq = hits / n
    assert torch.allclose(freq, torch.full((4,), 0.5), atol=0.05)


def test_reproducible_with_generator():
    labels = _labels()
    m1 = class_mix_masks(labels, torch.Generator().manual_seed(3))
    m2 = class_mix_masks(labels, torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)


def test_mix_places_source_where_mask():
    mask = torch.tensor([[[True, False], [False, True]]])
    src = torch.full((1, 3, 2, 2), 1.0)
    tgt = torch.full((1, 3, 2, 2), 2.0)
    out = mix(src, tgt, mask)
    assert out[0, :, 0, 0].eq(1).all() and out[0, :, 0, 1].eq(2).all()
    img, lbl, w = mix_batch(mask, src, tgt, torch.zeros(1, 2, 2, dtype=torch.long),
                            torch.ones(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 0.3))
    assert lbl.tolist() == [[[0, 1], [1, 0]]]
    torch.testing.assert_close(w, torch.tensor([[[1.0, 0.3], [0.3, 1.0]]]))
    assert img.shape == src.shape

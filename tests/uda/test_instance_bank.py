"""InstanceBank: file format, state handling, similarity and the reference EMA update (spec 6.2-6.3)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dida.constants import RARE_CLASS_ORDER
from dida.errors import DataError
from dida.uda.instance_bank import InstanceBank


def naive_update(features, bank_labels, emb_full, labels, momentum, class_mean="reference", absent="decay"):
    """Loop reference of spec 6.3, written from the text (used only here)."""
    f = features.clone()
    b = labels.shape[0]
    lab = labels.reshape(b, -1)
    emb = emb_full.reshape(b, emb_full.shape[1], -1)
    for c in range(int(bank_labels.max()) + 1):
        hits = torch.nonzero(lab == c)  # [n, 2]: (image, position); a position in both images twice
        if class_mean == "reference":
            vecs = [emb[0][:, p] for p in hits[:, 1].tolist()]
        else:
            vecs = [emb[i][:, p] for i, p in hits.tolist()]
        if not vecs:
            if absent == "skip":
                continue
            mean = torch.zeros(features.shape[1])
        else:
            mean = torch.stack(vecs).mean(0)
        for j in range(f.shape[0]):
            if int(bank_labels[j]) == c:
                f[j] = momentum * f[j] + (1 - momentum) * mean
    return f


def small_bank(k=6, d=3, c=3):
    g = torch.Generator().manual_seed(1)
    return InstanceBank(torch.rand(k, d, generator=g), torch.arange(k) % c)


# ---------------------------------------------------------------------------- construction, files


def test_random_bank_is_unit_balanced_and_reproducible():
    a = InstanceBank.random(20, 16, 19, generator=torch.Generator().manual_seed(0))
    b = InstanceBank.random(20, 16, 19, generator=torch.Generator().manual_seed(0))
    assert a.num_entries == 20 and a.dim == 16
    assert_close(a.features.norm(dim=1), torch.ones(20))
    assert (a.features >= 0).all()
    assert_close(a.features, b.features)
    counts = a.counts_per_class(19)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 20
    assert a.features.dtype == torch.float32 and a.labels.dtype == torch.int64


def test_npz_round_trip_in_reference_format(tmp_path):
    bank = small_bank()
    fp, lp = tmp_path / "f_buffer_s.npz", tmp_path / "l_buffer_s.npz"
    bank.save_npz(fp, lp)
    with np.load(fp) as f, np.load(lp) as lab:
        assert f.files == ["arr_0"] and lab.files == ["arr_0"]
        assert f["arr_0"].dtype == np.float32 and lab["arr_0"].dtype == np.int64
    assert zipfile.is_zipfile(fp)
    back = InstanceBank.from_npz(fp, lp)
    assert torch.equal(back.features, bank.features) and torch.equal(back.labels, bank.labels)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporaries left behind


def test_from_npz_errors_name_the_file(tmp_path):
    fp, lp = tmp_path / "f.npz", tmp_path / "l.npz"
    with pytest.raises(DataError, match=r"f\.npz.*does not exist.*dida bank build"):
        InstanceBank.from_npz(fp, lp)
    np.savez(fp, np.zeros((4, 3), np.float32))
    np.savez(lp, np.zeros(5, np.int64))
    with pytest.raises(DataError, match="disagree on K"):
        InstanceBank.from_npz(fp, lp)
    np.savez(lp, np.zeros(4, np.float32))
    with pytest.raises(DataError, match=r"l\.npz.*expected int64"):
        InstanceBank.from_npz(fp, lp)
    np.savez(fp, np.zeros(4, np.float32))
    with pytest.raises(DataError, match=r"f\.npz.*expected float32 \[K, D\]"):
        InstanceBank.from_npz(fp, lp)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"bad\.npz.*cannot be read"):
        InstanceBank.from_npz(tmp_path / "bad.npz", lp)
    np.savez(fp, np.zeros((4, 3), np.float32))
    np.savez(lp, np.full(4, 19, np.int64))
    with pytest.raises(DataError, match="class 19"):
        InstanceBank.from_npz(fp, lp, num_classes=19)


@pytest.mark.parametrize(
    "folder, histogram",
    [
        ("synthia2cs_cache_300", [20, 20, 20, 9, 19, 21, 18, 20, 20, 0, 18, 21, 21, 20, 0, 15, 0, 17, 21]),
        ("balanced_avg_cache_300", [16, 16, 16, 17, 15, 17, 16, 16, 17, 17, 16, 16, 15, 15, 15, 15, 15, 15, 15]),
    ],
)
def test_loads_the_shipped_banks(reference_dir, folder, histogram):
    d = reference_dir / "dida_banks" / folder
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    bank = InstanceBank.from_npz(d / "f_buffer_s.npz", d / "l_buffer_s.npz", num_classes=19)
    assert tuple(bank.features.shape) == (300, 256) and tuple(bank.labels.shape) == (300,)
    assert bank.features.dtype == torch.float32 and bank.labels.dtype == torch.int64
    assert bank.counts_per_class(19).tolist() == histogram
    assert (bank.features >= 0).all() and (bank.features.norm(dim=1) > 0).all()
    assert bank.labels[0].item() == RARE_CLASS_ORDER[0]


def test_state_dict_round_trip_and_device_move():
    bank = small_bank()
    sd = bank.state_dict()
    assert set(sd) == {"features", "labels"}
    other = InstanceBank(torch.zeros(6, 3), torch.zeros(6, dtype=torch.long))
    other.load_state_dict(sd)
    assert torch.equal(other.features, bank.features) and torch.equal(other.labels, bank.labels)
    assert other.num_classes == 3
    holder = torch.nn.Module()
    holder.bank = small_bank()
    moved = holder.to(torch.float64)  # buffers follow the module (float ones only)
    assert moved.bank.labels.dtype == torch.int64
    meta = small_bank().to("meta")
    assert meta.features.device.type == "meta" and meta.labels.device.type == "meta"


# ---------------------------------------------------------------------------- similarity


def test_similarity_is_raw_dot_product():
    bank = InstanceBank(torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 3.0]]), torch.tensor([0, 1, 1]))
    emb = torch.tensor([2.0, 5.0]).view(1, 2, 1, 1).expand(2, 2, 2, 3).clone()
    s = bank.similarity(emb)
    assert s.shape == (2, 3, 2, 3)
    assert_close(s[:, :, 0, 0], torch.tensor([[2.0, 12.0, 15.0]] * 2))


# ---------------------------------------------------------------------------- update


def test_update_hand_checked_ema_and_batch_position_quirk():
    # D = 1, classes {0, 1, 2}; one entry per class, all 10.
    bank = InstanceBank(torch.full((3, 1), 10.0), torch.tensor([0, 1, 2]))
    emb = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[100.0, 200.0], [300.0, 400.0]]]])  # [2,1,2,2]
    labels = torch.tensor([[[0, 0], [255, 255]], [[1, 255], [0, 255]]])
    bank.update(emb, labels, momentum=0.9)
    # class 0: image 0 at (0,0),(0,1); image 1 at (1,0) -> image-0 features 1, 2, 3 -> mean 2
    # class 1: only in image 1 at (0,0) -> image-0 feature at (0,0) = 1 (the quirk)
    # class 2: absent -> mean 0 -> decay
    assert_close(bank.features[:, 0], torch.tensor([0.9 * 10 + 0.1 * 2, 0.9 * 10 + 0.1 * 1, 9.0]))


def test_update_position_in_both_images_counts_twice():
    bank = InstanceBank(torch.zeros(1, 1), torch.tensor([0]))
    emb = torch.tensor([[[[1.0, 4.0]]], [[[0.0, 0.0]]]])  # [2,1,1,2]
    labels = torch.tensor([[[0, 0]], [[0, 255]]])  # position 0 in both images, position 1 in image 0
    bank.update(emb, labels, momentum=0.0)
    assert_close(bank.features, torch.tensor([[(1.0 + 1.0 + 4.0) / 3]]))


def test_update_absent_skip_and_per_image():
    emb = torch.tensor([[[[1.0, 2.0]]], [[[10.0, 20.0]]]])
    labels = torch.tensor([[[0, 255]], [[1, 0]]])
    bank = InstanceBank(torch.full((3, 1), 5.0), torch.tensor([0, 1, 2]))
    bank.update(emb, labels, momentum=0.5, class_mean="per_image", absent="skip")
    # class 0: image 0 pos 0 (1) and image 1 pos 1 (20) -> 10.5; class 1: image 1 pos 0 -> 10
    assert_close(bank.features[:, 0], torch.tensor([0.5 * 5 + 0.5 * 10.5, 0.5 * 5 + 0.5 * 10, 5.0]))
    bank = InstanceBank(torch.full((3, 1), 5.0), torch.tensor([0, 1, 2]))
    bank.update(emb, labels.unsqueeze(1), momentum=0.5, absent="decay")  # [B,1,H,W] labels accepted
    assert_close(bank.features[2, 0], torch.tensor(2.5))


def test_update_ignores_all_ignore_pixels_and_unknown_classes():
    bank = InstanceBank(torch.ones(2, 2), torch.tensor([0, 1]))
    emb = torch.rand(1, 2, 3, 3)
    bank.update(emb, torch.full((1, 3, 3), 255), momentum=0.5, absent="skip")
    assert_close(bank.features, torch.ones(2, 2))
    bank.update(emb, torch.full((1, 3, 3), 7), momentum=0.5)  # class 7 has no entry: ignored
    assert_close(bank.features, torch.full((2, 2), 0.5))


@pytest.mark.parametrize("class_mean", ["reference", "per_image"])
@pytest.mark.parametrize("absent", ["decay", "skip"])
def test_update_matches_naive_loop(class_mean, absent):
    g = torch.Generator().manual_seed(3)
    k, d, c = 10, 4, 5
    features = torch.rand(k, d, generator=g)
    bank_labels = torch.tensor([4, 0, 1, 2, 3, 4, 0, 1, 2, 3])
    bank = InstanceBank(features, bank_labels)
    emb = torch.rand(3, d, 6, 7, generator=g)
    labels = torch.randint(0, c - 1, (3, 6, 7), generator=g)  # class 4 absent
    labels[torch.rand(3, 6, 7, generator=g) < 0.2] = 255
    labels[0][labels[0] == 3] = 2  # class 3 only in images 1 and 2
    expected = naive_update(features, bank_labels, emb, labels, 0.9, class_mean, absent)
    bank.update(emb, labels, 0.9, class_mean=class_mean, absent=absent)
    assert_close(bank.features, expected)


@pytest.mark.parametrize("class_mean", ["reference", "per_image"])
def test_low_resolution_update_equals_full_resolution(class_mean):
    g = torch.Generator().manual_seed(4)
    bank_labels = torch.arange(12) % 4
    features = torch.rand(12, 8, generator=g)
    emb_low = torch.rand(2, 8, 5, 6, generator=g)
    labels = torch.randint(0, 4, (2, 20, 22), generator=g)
    labels[:, :3] = 255
    emb_full = F.interpolate(emb_low, size=(20, 22), mode="bilinear", align_corners=False)
    a = InstanceBank(features, bank_labels)
    b = InstanceBank(features, bank_labels)
    a.update(emb_low, labels, 0.5, class_mean=class_mean)
    b.update(emb_full, labels, 0.5, class_mean=class_mean)
    assert_close(a.features, b.features, rtol=1e-5, atol=1e-6)
    assert_close(b.features, naive_update(features, bank_labels, emb_full, labels, 0.5, class_mean))


def test_update_rejects_bad_shapes():
    bank = small_bank()
    with pytest.raises(ValueError, match="channels"):
        bank.update(torch.rand(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 0.9)
    with pytest.raises(ValueError, match="labels"):
        bank.update(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long), 0.9)
    with pytest.raises(ValueError, match="absent"):
        bank.update(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 0.9, absent="zero")


@pytest.mark.gpu
@pytest.mark.parametrize("class_mean", ["reference", "per_image"])
def test_update_on_cuda_matches_naive_loop(class_mean):
    g = torch.Generator().manual_seed(6)
    features, bank_labels = torch.rand(10, 4, generator=g), torch.arange(10) % 5
    emb_low = torch.rand(2, 4, 6, 7, generator=g)
    labels = torch.randint(0, 4, (2, 24, 28), generator=g)
    labels[:, :2] = 255
    emb_full = F.interpolate(emb_low, size=(24, 28), mode="bilinear", align_corners=False)
    expected = naive_update(features, bank_labels, emb_full, labels, 0.9, class_mean)
    bank = InstanceBank(features, bank_labels).cuda()
    bank.update(emb_low.cuda(), labels.cuda(), 0.9, class_mean=class_mean)
    assert bank.features.device.type == "cuda"
    assert_close(bank.features.cpu(), expected, rtol=1e-5, atol=1e-6)

"""``dida bank build``: class-balanced selection, per-image class means, the CLI end to end."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from dida import checkpoint
from dida.constants import RARE_CLASS_ORDER
from dida.data import fake
from dida.uda.bank_builder import balanced_selection, build_bank, class_order
from dida.uda.instance_bank import InstanceBank


def test_class_order_follows_rare_order():
    assert class_order(19) == list(RARE_CLASS_ORDER)
    assert class_order(4) == [c for c in RARE_CLASS_ORDER if c < 4]
    assert class_order(21)[-2:] == [19, 20]


def test_balanced_selection_round_robin():
    order = [2, 0, 1, 3]
    labels = balanced_selection([5, 5, 5, 0], 7, order)
    assert labels == [2, 0, 1, 2, 0, 1, 2]
    # class 1 runs out after one entry: the others keep alternating
    labels = balanced_selection([5, 1, 5, 0], 8, order)
    assert labels == [2, 0, 1, 2, 0, 2, 0, 2]
    counts = np.bincount(labels, minlength=4)
    assert counts.tolist() == [3, 1, 4, 0]
    with pytest.raises(ValueError, match="only 3 candidates"):
        balanced_selection([1, 1, 1, 0], 4, order)


class _Dataset:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return self.images[i], self.labels[i]


class _StubModel(nn.Module):
    """Embedding = the normalised image average-pooled by 4 (D = 3), non-negative after relu."""

    num_classes = 3

    def forward(self, img):
        return SimpleNamespace(embedding=F.relu(F.avg_pool2d(img, 4)))

    predict = forward  # the segmentor protocol's test-time forward


def test_build_bank_rows_are_per_image_class_means_of_the_upsampled_embedding():
    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(3):
        images.append(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
        lab = rng.integers(0, 3, (16, 24)).astype(np.uint8)
        lab[0] = 255
        labels.append(lab)
    ds = _Dataset(images, labels)
    model = _StubModel()
    bank = build_bank(model, ds, size=6, num_classes=3, seed=0, img_scale=(24, 16), progress=False)
    assert bank.num_entries == 6 and bank.dim == 3
    assert bank.counts_per_class(3).tolist() == [2, 2, 2]
    assert bank.labels[:3].tolist() == class_order(3)

    from dida.data.transforms import TestPipeline

    expected = {c: [] for c in range(3)}
    for img, lab in zip(images, labels):
        x = TestPipeline((24, 16))(img)[None]
        up = F.interpolate(model(x).embedding, size=(16, 24), mode="bilinear", align_corners=False)[0]
        lab_t = torch.from_numpy(lab).long()
        for c in range(3):
            expected[c].append(up[:, lab_t == c].mean(1))
    for row, c in zip(bank.features, bank.labels.tolist()):
        dists = torch.stack([(row - e).abs().max() for e in expected[c]])
        assert dists.min() < 1e-4
    # reproducible
    again = build_bank(model, ds, size=6, num_classes=3, seed=0, img_scale=(24, 16), progress=False)
    assert torch.equal(again.features, bank.features)


def test_cli_builds_a_balanced_bank_in_the_reference_format(tmp_path, capsys):
    from dida.cli import main
    from dida.models import build_segmentor

    root = fake.write_fake_gta(tmp_path / "gta", n=4, size=(64, 32), seed=0)
    kwargs = {"embed_dims": [8, 16, 32, 64], "num_heads": [1, 1, 1, 1], "depths": [1, 1, 1, 1],
              "decoder_channels": 16}
    model = build_segmentor("mit_b0", 19, **kwargs, generator=torch.Generator().manual_seed(0))
    yaml_text = (
        "model:\n  backbone: mit_b0\n  num_classes: 19\n  embed_dims: [8, 16, 32, 64]\n"
        "  num_heads: [1, 1, 1, 1]\n  depths: [1, 1, 1, 1]\n  decoder_channels: 16\n"
    )
    ckpt = tmp_path / "source.pth"
    checkpoint.save_checkpoint(ckpt, {"model": model.state_dict(), "config": yaml_text})

    from dida.data import GTADataset

    ds = GTADataset(root)
    images_per_class = np.zeros(19, dtype=np.int64)
    for i in range(len(ds)):
        lab = ds.load(i)[1]
        present = np.unique(lab[lab != 255])
        images_per_class[present] += 1
    present = np.flatnonzero(images_per_class)
    size = len(present) * int(images_per_class[present].min())

    out = tmp_path / "bank"
    rc = main(["bank", "build", str(ckpt), "--data", str(root), "--dataset", "gta", "--size", str(size),
               "--out", str(out), "--device", "cpu", "--img-scale", "64", "32"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "f_buffer_s.npz" in printed and "entries per class" in printed
    with np.load(out / "f_buffer_s.npz") as f, np.load(out / "l_buffer_s.npz") as lab:
        assert f.files == ["arr_0"] and lab.files == ["arr_0"]
        feats, labels = f["arr_0"], lab["arr_0"]
    assert feats.dtype == np.float32 and feats.shape == (size, 16)
    assert labels.dtype == np.int64 and labels.shape == (size,)
    hist = np.bincount(labels, minlength=19)
    assert set(np.flatnonzero(hist)) == set(present.tolist())
    assert hist[present].max() - hist[present].min() <= 1
    assert labels[: len(present)].tolist() == [c for c in RARE_CLASS_ORDER if c in set(present.tolist())]
    assert (feats >= 0).all()  # post-ReLU embeddings
    bank = InstanceBank.from_npz(out / "f_buffer_s.npz", out / "l_buffer_s.npz", num_classes=19)
    assert_close(bank.features, torch.from_numpy(feats))


def test_cli_reports_missing_checkpoint(tmp_path, capsys):
    from dida.cli import main

    rc = main(["bank", "build", str(tmp_path / "nope.pth"), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
               "--device", "cpu"])  # fmt: skip
    assert rc == 2
    assert "nope.pth" in capsys.readouterr().err

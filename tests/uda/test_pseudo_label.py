from __future__ import annotations

import torch

from dida.uda.pseudo_label import pseudo_labels, pseudo_weight


def test_pseudo_labels_on_2x2():
    probs = torch.tensor([[[[0.9, 0.2], [0.5, 0.01]],
                           [[0.1, 0.8], [0.5, 0.99]]]])
    labels, conf = pseudo_labels(probs)
    assert labels.tolist() == [[[0, 1], [0, 1]]]
    torch.testing.assert_close(conf, torch.tensor([[[0.9, 0.8], [0.5, 0.99]]]))


def test_pseudo_weight_is_one_batch_scalar():
    conf = torch.tensor([[[0.99, 0.5], [0.97, 0.1]],
                         [[0.1, 0.1], [0.968, 0.2]]])
    w = pseudo_weight(conf, 0.968)
    # 3 of the 8 pixels are >= 0.968 (the threshold itself counts).
    torch.testing.assert_close(w, torch.full((2, 2, 2), 3 / 8))


def test_pseudo_weight_rows_are_cropped():
    conf = torch.ones(1, 6, 3)
    w = pseudo_weight(conf, 0.5, ignore_top=1, ignore_bottom=2)
    assert w[0, :, 0].tolist() == [0, 1, 1, 1, 0, 0]
    # 0 disables cropping (a bare [-0:] slice would zero everything).
    assert pseudo_weight(conf, 0.5, 0, 0).eq(1).all()


def test_pseudo_weight_keeps_device_and_no_grad():
    conf = torch.rand(2, 4, 4)
    w = pseudo_weight(conf, 0.5)
    assert w.device == conf.device and w.dtype == torch.float32 and not w.requires_grad

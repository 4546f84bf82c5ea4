from __future__ import annotations

import torch
from torch import nn

from dida.uda.ema import EMATeacher


class DropPath(nn.Module):  # same name as the project's/timm's module
    def forward(self, x):
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout2d(0.5)
        self.dp = DropPath()

    def forward(self, x):
        return self.dp(self.drop(self.bn(self.conv(x))))


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_decay_schedule():
    t = EMATeacher(Net(), alpha=0.999)
    assert t.decay(0) == 0.0
    assert t.decay(1) == 0.5
    assert t.decay(2) == 1 - 1 / 3
    assert abs(t.decay(999) - 0.999) < 1e-15
    assert t.decay(5000) == 0.999


def test_init_copies_parameters_not_buffers():
    student = Net()
    teacher = EMATeacher(student)
    _randomize(student, 0)
    student.bn.running_mean.fill_(3.0)
    teacher.init_from(student)
    for a, b in zip(teacher.model.parameters(), student.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    assert teacher.model.bn.running_mean.eq(0).all()


def test_update_closed_form_and_buffers_untouched():
    student = Net()
    teacher = EMATeacher(student, alpha=0.999)
    before = [p.clone() for p in teacher.model.parameters()]
    _randomize(student, 1)
    student.bn.running_var.fill_(7.0)
    teacher.update(student, step=1)
    for t, b, s in zip(teacher.model.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
    assert teacher.model.bn.running_var.eq(1).all()
    teacher.update(student, step=3)  # alpha 0.75
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_update_buffers_option():
    student = Net()
    teacher = EMATeacher(student, update_buffers=True)
    student.bn.running_mean.fill_(4.0)
    student.bn.num_batches_tracked.fill_(9)
    teacher.update(student, step=1)
    torch.testing.assert_close(teacher.model.bn.running_mean, torch.full((4,), 2.0))
    assert teacher.model.bn.num_batches_tracked.item() == 9


def test_predict_modes_and_no_grad():
    student = Net()
    teacher = EMATeacher(student)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out1 = teacher.predict(x)
    assert not out1.requires_grad
    m = teacher.model
    assert m.training and m.bn.training and not m.drop.training and not m.dp.training
    # Dropout is off: two calls agree; BN is in train mode: running stats moved.
    torch.testing.assert_close(teacher.predict(x), out1)
    assert not m.bn.running_mean.eq(0).all()


def test_predict_bn_eval():
    teacher = EMATeacher(Net(), bn_eval=True)
    teacher.predict(torch.randn(2, 3, 4, 4))
    assert not teacher.model.bn.training and teacher.model.bn.running_mean.eq(0).all()

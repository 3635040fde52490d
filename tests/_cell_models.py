"""A small NASNet-like network for the tuple-boundary tests: each cell reads the two previous cells."""

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 8
SIZE = (3, 16, 16)
CLASSES = 5


def _conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out))


class Cell(nn.Module):
    """Two branches over the previous cell (``x``) and the one before (``x_prev``), concatenated.

    ``reduce`` halves the resolution of both.
    """

    def __init__(self, c_in: int, c_prev: int, reduce: bool = False):
        super().__init__()
        stride = 2 if reduce else 1
        self.pre = _conv_bn(c_in, WIDTH)
        self.pre_prev = _conv_bn(c_prev, WIDTH)
        self.left = _conv_bn(WIDTH, WIDTH, 3, stride)
        self.right = _conv_bn(WIDTH, WIDTH, 3, stride)
        self.skip = nn.AvgPool2d(stride) if reduce else nn.Identity()

    def forward(self, x, x_prev):
        a = self.pre(F.relu(x))
        b = self.pre_prev(F.relu(x_prev))
        left = self.left(F.relu(a)) + self.skip(b)
        right = F.dropout(self.right(F.relu(b)), 0.2, self.training) + self.skip(a)
        return torch.cat([left, right], 1)


class CellNet(nn.Module):
    """stem, stem2, cells 0-2 (cell 2 reduces), a transition conv, cells 3-4.

    Each cell reads the two outputs before it; only the reduction cell's output alone reaches
    the rest, so the transition takes one tensor and returns two, the cells take two.
    """

    def __init__(self, num_classes: int = CLASSES):
        super().__init__()
        self.stem = _conv_bn(3, WIDTH, 3)
        self.stem2 = nn.Sequential(_conv_bn(WIDTH, WIDTH, 3), nn.ReLU())  # not linear: its own block
        c = 2 * WIDTH
        self.cell0 = Cell(WIDTH, WIDTH)
        self.cell1 = Cell(c, WIDTH)
        self.cell2 = Cell(c, c, reduce=True)
        self.transition = _conv_bn(c, c, 3)
        self.cell3 = Cell(c, c)
        self.cell4 = Cell(c, c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        s0 = self.stem(x)
        s1 = self.stem2(s0)
        c0 = self.cell0(s1, s0)
        c1 = self.cell1(c0, s1)
        c2 = self.cell2(c1, c0)
        t = F.relu(self.transition(c2))
        c3 = self.cell3(t, c2)
        c4 = self.cell4(c3, t)
        return self.fc(F.relu(c4).mean((2, 3)))


def cell_net(num_classes: int = CLASSES) -> CellNet:
    """The factory a spec ``tests/_cell_models.py:cell_net`` names."""
    return CellNet(num_classes)

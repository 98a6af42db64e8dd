"""PyTorch peer of experiments/resnet_gap_bn.cfg and resnet_gap_plain.cfg (not part of the package).

Trains the same net (batch-normed 3x3 stem, max-pool, three residual blocks of two 3x3
convolutions, global average pooling, dense 10; or, with `plain`, the same convolutions without
batch norm and shortcuts) with SGD + Nesterov momentum 0.9 and a cosine schedule, batch 128, on
the packaged MNIST's 50,000 training images, and prints the test accuracy.

    .venv-torch/bin/python benchmarks/torch_resnet_gap.py LR bn|plain EPOCHS   # e.g. 0.02 bn 1
"""

from __future__ import annotations

import glob
import gzip
import math
import pickle
import sys
import time

import numpy as np
import torch
from torch import nn


def maybe_bn(bn: bool) -> list[nn.Module]:
    return [nn.BatchNorm2d(16)] if bn else []


class Block(nn.Module):
    """Two 3x3 convolutions; with bn, batch norm after each and the identity shortcut."""

    def __init__(self, bn: bool):
        super().__init__()
        self.bn = bn
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), *maybe_bn(bn), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), *maybe_bn(bn))

    def forward(self, v):
        return torch.relu(self.body(v) + v) if self.bn else torch.relu(self.body(v))


def main() -> None:
    lr, bn, epochs = float(sys.argv[1]), sys.argv[2] == "bn", int(sys.argv[3])
    torch.set_num_threads(2)
    path = sorted(glob.glob(".venv/lib/python*/site-packages/mnist/data/mnist.pkl.gz"))[0]
    with gzip.open(path) as f:
        (x, y), _, (xt, yt) = pickle.load(f, encoding="latin1")
    x, xt = (torch.from_numpy(a.reshape(-1, 1, 28, 28)) for a in (x, xt))
    y, yt = (torch.from_numpy(a.astype(np.int64)) for a in (y, yt))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), *maybe_bn(bn), nn.ReLU(), nn.MaxPool2d(2),
                        Block(bn), Block(bn), Block(bn), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for m in net.modules():  # digits' --init=he: normal with variance 2 / fan_in, zero biases
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True)
    batch, steps_per_epoch = 128, 50000 // 128
    total, step, start = steps_per_epoch * epochs, 0, time.time()
    for _ in range(epochs):
        perm = torch.randperm(50000)
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum()) for i in range(0, 10000, 1000))
    print(f"lr {lr} bn {bn} epochs {epochs}: test {correct / 10000:.4f}, last loss {loss.item():.3f}, "
          f"{time.time() - start:.1f} s")


if __name__ == "__main__":
    main()

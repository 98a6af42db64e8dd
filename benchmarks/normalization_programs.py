"""What the compiled programs of manual and automatic differentiation contain, for batch norm and
residual nets: FLOPs, bytes accessed, temporary memory, and counts of fusions, reductions, dots and
convolutions in one step's compiled value_and_grad (with the batch-norm state), batch 128.

    python benchmarks/normalization_programs.py            # the three nets of docs/performance.md
    python benchmarks/normalization_programs.py "conv3x3:8:same,batchnorm,relu,dense:10"
"""

from __future__ import annotations

import collections
import re
import sys

import jax
import jax.numpy as jnp

from digits import backprop, model

NETS = (
    "conv3x3:32:same,batchnorm,relu,maxpool2,conv3x3:32:same,batchnorm,relu,maxpool2,dense:10",
    "conv3x3:32:same,batchnorm,relu,res(conv3x3:32:same,batchnorm,relu,conv3x3:32:same,batchnorm),relu,maxpool2,"
    "res(conv3x3:32:same,batchnorm,relu,conv3x3:32:same,batchnorm),relu,maxpool2,dense:10",
    "conv3x3:32:same,relu,conv3x3:32:same,relu,maxpool2,conv3x3:32:same,relu,maxpool2,dense:10",
)


def analyse(text: str, batch: int = 128) -> list[dict]:
    spec = model.spec_from_text(text, (28, 28), init="he")
    params, state = model.init(jax.random.PRNGKey(0), spec), model.init_state(spec)
    images = (jnp.zeros((batch, 28, 28, 1)), jnp.zeros((batch,), jnp.int32))
    rows = []
    for name, fn in (("manual", backprop.value_and_grad), ("autodiff", backprop.autodiff_value_and_grad)):
        compiled = jax.jit(lambda p, b, s, fn=fn: fn(p, b, spec, None, s)).lower(params, images, state).compile()
        hlo = compiled.as_text()
        ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", hlo))
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        rows.append({"grad": name, "mflop": cost["flops"] / 1e6, "mb_accessed": cost["bytes accessed"] / 1e6,
                     "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6, "fusions": ops["fusion"],
                     "reduces": ops["reduce"], "dots": ops["dot"], "convolutions": ops["convolution"]})
    return rows


if __name__ == "__main__":
    print("| network | grad | MFLOP/step | MB accessed | temp MB | fusions | reduce ops | dots | convolutions |")
    print("|---|---|---|---|---|---|---|---|---|")
    for net in sys.argv[1:] or NETS:
        for i, r in enumerate(analyse(net)):
            print(f"| {'`' + net + '`' if i == 0 else ''} | {r['grad']} | {r['mflop']:.0f} | {r['mb_accessed']:.0f} | "
                  f"{r['temp_mb']:.1f} | {r['fusions']} | {r['reduces']} | {r['dots']} | {r['convolutions']} |")

"""How digits compiles its programs: XLA:CPU at LLVM -O2 instead of XLA's default -O3.

Measured on the 2-core AMD EPYC (JAX 0.10.2, quiet; docs/performance.md): -O2 compiled the
speedrun's initialisation program in 1.0-1.3 s against 2.6-3.4 s, its training chunk in 1.8-1.9 s
against 2.3-2.8 s, and the chunk ran as fast or faster (the speedrun net 17.6-17.9 against
19.2-19.6 ms/step, chapter 6's 3.0 against 3.2, conv_best's and a dense net's within 2%, a
batch-norm ResNet's 2% slower, within its noise). The values agree to rounding, not always bit
for bit: those five nets' parameters were bit-identical after 70-1,200 steps, but 4 of a 3x3x1x4
kernel's 36 initial weights differ by 1 ulp, so a run's last bits can differ from an -O3 build's
(its accuracy distribution does not). -O0 changes values more and -O1 ran slower. Other
platforms keep their defaults (none of this was measured there).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.extend.core

OPT_LEVEL_OPTION = "xla_backend_optimization_level"
CPU_OPT_LEVEL = 2


def options(platform: str | None = None) -> dict:
    """XLA compiler options for programs on `platform` (default: JAX's default backend). A level
    given in XLA_FLAGS (`--xla_backend_optimization_level=N`) wins: the tests compile at -O0."""
    platform = platform or jax.default_backend()
    if platform != "cpu" or f"--{OPT_LEVEL_OPTION}" in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {OPT_LEVEL_OPTION: CPU_OPT_LEVEL}


def _inside_a_jit(args, kwargs) -> bool:
    """Whether this call is being traced into a larger program (a jit, a loop body), where JAX
    refuses compiler options on a nested jit. vmap alone keeps them."""
    under_a_jit = getattr(jax.extend.core, "unsafe_am_i_under_a_jit_DO_NOT_USE", None)
    if under_a_jit is not None:
        return under_a_jit()
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))


def jit(fun=None, *, platform: str | None = None, **jit_kwargs):
    """`jax.jit` (same arguments, usable as a decorator) whose programs compile with `options()`.

    With `platform` (a plan's, known when the program is built): jax.jit for it, a top-level
    program. Without: for the default backend of each call, read at the call, not at import (a
    module's programs must not initialise JAX's backends, which fixes the device count); called
    while another jit is traced (which alone may carry compiler options), it runs `fun` as part
    of that program."""
    if fun is None:
        return functools.partial(jit, platform=platform, **jit_kwargs)

    @functools.cache
    def for_platform(platform: str):
        return jax.jit(fun, compiler_options=options(platform) or None, **jit_kwargs)

    if platform is not None:
        return for_platform(platform)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        if _inside_a_jit(args, kwargs):
            return fun(*args, **kwargs)
        return for_platform(jax.default_backend())(*args, **kwargs)

    call.lower = lambda *args, **kwargs: for_platform(jax.default_backend()).lower(*args, **kwargs)
    return call

"""Devices and processes: the mesh a run trains on, placing arrays on it, and `jax.distributed`.

A run spreads over a 2-D device mesh. Its K models (seeds x learning rates) lie along the
`model` axis: models never talk to each other, so that axis costs no communication. Each
model's batch is split along the `data` axis: every device there computes the gradient of its
slice and the slices' gradients are summed across the axis (the all-reduce, written out in
`backprop.all_reduce_mean`). The default split puts gcd(K, D) devices on `model` and the rest
on `data`.

One device is not a 1x1 mesh: it is no mesh (`Layout.mesh is None`), and the training program
is exactly the single-device one. Several processes (`jax.distributed`) see one global device
list; every process holds the whole (small) dataset and the same host copy of the initial
state, and `place` builds global arrays from them.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODEL, DATA = "model", "data"


@dataclasses.dataclass(frozen=True)
class Layout:
    """model_size x data_size devices; `mesh` is None for one device."""

    mesh: Mesh | None
    model_size: int = 1
    data_size: int = 1

    @property
    def num_devices(self) -> int:
        return self.model_size * self.data_size

    @property
    def platform(self) -> str:
        """The devices' platform ("cpu", "gpu", "tpu"): the mesh's, or JAX's default backend."""
        return jax.default_backend() if self.mesh is None else self.mesh.devices.flat[0].platform

    def describe(self) -> str:
        if self.mesh is None:
            return "1 device"
        kind = self.mesh.devices.flat[0].platform
        return f"{self.num_devices} {kind} devices = {self.model_size} (model) x {self.data_size} (data)"

    def to_dict(self) -> dict:
        return {"num_devices": self.num_devices, "model_axis": self.model_size, "data_axis": self.data_size,
                "processes": jax.process_count()}

    def sharding(self, spec: P) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, spec)


SINGLE = Layout(None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_layout(num_models: int, batch_size: int, requested: int = 0, devices=None) -> Layout:
    """The mesh for K = num_models models with `batch_size` examples per step.

    requested = 0: use as many of `devices` (default: all of JAX's default platform, across
    processes) as split evenly (model axis gcd(K, D), data axis the largest divisor of the rest
    that divides the batch). requested = N: exactly N devices, or a one-line ValueError saying
    why they cannot be used.
    """
    devices = list(jax.devices() if devices is None else devices)
    available = len(devices)
    if requested > available:
        raise ValueError(f"num_devices={requested} but only {available} {devices[0].platform} device(s) are available")
    total = requested or available
    model_size = math.gcd(num_models, total)
    rest = total // model_size
    if requested:
        data_size = rest
        if data_size > batch_size:
            raise ValueError(f"num_devices={requested} puts {data_size} devices on the data axis but a step has only "
                             f"{batch_size} examples: more devices than examples")
        if batch_size % data_size:
            raise ValueError(f"batch_size={batch_size} cannot be split over the data axis of {data_size} devices "
                             f"(num_devices={requested} = {model_size} model x {data_size} data); choose a batch size "
                             f"divisible by {data_size} or another --num_devices")
    else:
        data_size = max(d for d in _divisors(rest) if batch_size % d == 0)
    if jax.process_count() > 1 and model_size * data_size < available:
        raise ValueError(f"with {jax.process_count()} processes every device must take part, but the mesh uses "
                         f"{model_size * data_size} of {available}; choose a batch size or model count that splits "
                         "evenly")
    if model_size * data_size == 1:
        return SINGLE
    grid = np.array(devices[: model_size * data_size]).reshape(model_size, data_size)
    # Auto axes: with explicit axis types (make_mesh's default) products such as x.T @ dz under
    # jit raise sharding type errors.
    return Layout(Mesh(grid, (MODEL, DATA), axis_types=(AxisType.Auto, AxisType.Auto)), model_size, data_size)


def place(tree, layout: Layout, spec: P):
    """Host or single-device arrays -> global arrays laid out as `spec` on the mesh (every
    process passes the same full values). One device: committed to the default device as before."""
    if layout.mesh is None:
        return jax.device_put(tree)
    sharding = layout.sharding(spec)

    def put(leaf):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def replicated(tree, layout: Layout):
    """The same values on every device of the mesh (the dataset, a shared data order)."""
    if layout.mesh is None:
        return jax.device_put(tree)
    sharding = layout.sharding(P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def host_value(array) -> np.ndarray:
    """A global array's value on this host: the whole of it when replicated, else this process's
    first shard (enough for values that every model shares, such as the step counter)."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    return np.asarray(array.addressable_shards[0].data)


# --- processes ------------------------------------------------------------------------------------

# Environment variables by which JAX's own cluster detection recognises a multi-process job.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def in_cluster_job() -> bool:
    """True under SLURM / Open MPI with several tasks, or on a multi-host TPU slice."""
    sizes = [int(os.environ.get(v, "1") or 1) for v in _CLUSTER_SIZE_VARIABLES]
    return max(sizes) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               cpu_devices: int = 0) -> None:
    """Sets up devices and processes; call before any JAX computation.

    cpu_devices > 0 makes the CPU platform expose that many devices (for trying meshes on one
    machine). With a coordinator address, joins a `jax.distributed` job of `num_processes`
    processes as `process_id`; without one, a SLURM / Open MPI / TPU-pod job is joined through
    JAX's own detection, and anything else stays a single process. CPU collectives across
    processes go through gloo.
    """
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if not (coordinator_address or in_cluster_job()):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()


def is_primary() -> bool:
    """Process 0 prints, draws the progress bar and writes metrics, plots and summaries."""
    return jax.process_index() == 0

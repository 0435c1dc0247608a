"""Which devices a pipeline runs on, and how they form its (data, expert, tensor) mesh.

`devices` names them ("cpu", "gpu", "gpu:0,1", "0,1", "4" for the first four,
"all"; default all of the default backend's devices), `tensor_parallel_degree`
splits one replica's heads, MLP and vocabulary across devices,
`expert_parallel_degree` splits a mixture-of-experts model's experts, and
`data_parallel_degree` runs that many replicas side by side. Every mistake is
caught here, before anything is loaded.
"""

from __future__ import annotations

import os
import socket
import time

import jax

from maxlike.config import ConfigError


def select_devices(spec: str | None) -> list[jax.Device]:
    """The devices `spec` names (see the module docstring), in id order."""
    spec = (spec or "all").strip()
    platform, _, ids = spec.partition(":") if ":" in spec else ("", "", spec)
    if ids in ("cpu", "gpu", "tpu", "cuda", "rocm"):
        platform, ids = ids, "all"
    try:
        present = jax.devices(platform or None)
    except RuntimeError as e:
        raise ConfigError(f"devices={spec!r}: no {platform} devices are present here ({e}).") from None
    kind = present[0].platform
    if ids == "all":
        return present
    try:
        numbers = [int(x) for x in ids.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"devices={spec!r} is not understood: use 'all', a count such as '4', "
                          "ids such as '0,1' or 'gpu:0,1'.") from None
    if len(numbers) == 1 and "," not in ids and not platform:
        count = numbers[0]
        if not 1 <= count <= len(present):
            raise ConfigError(f"devices={spec!r} asks for {count} devices but {len(present)} {kind} device(s) "
                              f"are present: pass devices <= {len(present)}.")
        return present[:count]
    by_id = {d.id: d for d in present}
    missing = [n for n in numbers if n not in by_id]
    if missing:
        raise ConfigError(f"devices={spec!r}: no {kind} device with id {missing}; present ids are "
                          f"{sorted(by_id)}.")
    return [by_id[n] for n in numbers]


def target_devices(target: str) -> list:
    """The devices of hardware this machine lacks, to compile for: "tpu:<topology>"
    (any name `jax.experimental.topologies.get_topology_desc` accepts, e.g. "v5e:2x2",
    "v5p:2x2x1", "v6e:4x4"). Needs libtpu; nothing runs on these devices."""
    platform, _, topology = target.partition(":")
    if platform != "tpu" or not topology:
        raise ConfigError(f"compile_target={target!r} is not understood: use 'tpu:<topology>', e.g. 'tpu:v5e:2x2' "
                          "(a TPU v5e slice of 2x2 chips).")
    # Without these libtpu asks a metadata server which TPU this host belongs to (there is none here)
    # and prints a page of warnings; they only describe the local host, not the target. Its lockfile
    # would admit one process per machine: two compiling at once (two test workers) failed with
    # "Internal error when accessing libtpu multi-process lockfile"; compiling uses no TPU to share.
    for name, value in (("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(name, value)
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # noqa: BLE001 - jax raises RuntimeError or its own runtime error here
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "not installed" in message:
            raise ConfigError(f"compile_target={target!r} needs libtpu, which is not installed: "
                              "pip install 'maxlike[tpu]' (it matches libtpu to your jax).") from None
        raise ConfigError(f"compile_target={target!r}: libtpu does not know that topology ({message}). "
                          "Names look like 'v5e:2x2', 'v5p:2x2x1' or 'v6e:4x4'.") from None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_split_problem(tp: int, *, q_heads: int, kv_heads: int, vocab: int, intermediate: int,
                         experts: int = 0, expert_width: int = 0) -> str | None:
    """Why a model cannot be split `tp` ways (None if it can). KV heads fewer than
    `tp` are replicated, so they need only divide it."""
    if q_heads % tp:
        return f"its {q_heads} attention heads do not split {tp} ways"
    if kv_heads % tp and tp % kv_heads:
        return f"its {kv_heads} KV heads neither split {tp} ways nor divide {tp} (to be replicated)"
    if vocab % tp:
        return f"its vocabulary of {vocab} does not split {tp} ways"
    if intermediate % tp:
        return f"its MLP width {intermediate} does not split {tp} ways"
    if experts and expert_width % tp:
        return f"its experts' width {expert_width} does not split {tp} ways"
    return None


def _positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def plan_mesh(devices: list[jax.Device], data_parallel_degree: int | None, tensor_parallel_degree: int | None,
              expert_parallel_degree: int | None = None, **model) -> tuple[int, int, int]:
    """(data, expert, tensor) degrees for `devices` and a model described by `model`
    (q_heads, kv_heads, vocab, intermediate; experts and expert_width for a mixture of
    experts). The expert degree is 1 unless set; of the devices it leaves, unset degrees are
    chosen: the widest tensor split the model allows, the rest as data-parallel replicas."""
    n = len(devices)
    dp, tp, ep = data_parallel_degree, tensor_parallel_degree, expert_parallel_degree
    for name, value in (("data_parallel_degree", dp), ("tensor_parallel_degree", tp),
                        ("expert_parallel_degree", ep)):
        _positive(name, value)
    experts = model.get("experts", 0)
    ep = ep or 1
    if ep > 1 and not experts:
        raise ConfigError(f"expert_parallel_degree={ep} splits a mixture-of-experts model's experts, and this model "
                          "has none: leave it unset (use tensor_parallel_degree or data_parallel_degree).")
    if experts and experts % ep:
        fits = [d for d in _divisors(n) if experts % d == 0]
        raise ConfigError(f"expert_parallel_degree={ep} does not fit this model: its {experts} experts do not split "
                          f"{ep} ways. Degrees that fit: {fits}.")
    if n % ep:
        raise ConfigError(f"expert_parallel_degree={ep} does not divide the {n} selected devices: pass devices={ep}.")
    if dp is not None and tp is not None and dp * ep * tp != n:
        raise ConfigError(f"data_parallel_degree={dp} x tensor_parallel_degree={tp}"
                          + (f" x expert_parallel_degree={ep}" if ep > 1 else "")
                          + f" needs {dp * ep * tp} devices but {n} are selected: pass devices={dp * ep * tp} "
                          "(or change a degree).")
    room = n // ep
    if dp is not None and room % dp:
        raise ConfigError(f"data_parallel_degree={dp} does not divide the {room} selected devices"
                          + (f" left by expert_parallel_degree={ep}" if ep > 1 else "") + ".")
    if tp is not None and room % tp:
        raise ConfigError(f"tensor_parallel_degree={tp} does not divide the {room} selected devices"
                          + (f" left by expert_parallel_degree={ep}" if ep > 1 else "")
                          + f": pass devices={tp * (dp or 1) * ep}.")
    if tp is None:
        tp = max(d for d in _divisors(room // (dp or 1)) if tensor_split_problem(d, **model) is None)
    problem = tensor_split_problem(tp, **model)
    if problem:
        fits = [d for d in _divisors(room) if tensor_split_problem(d, **model) is None]
        raise ConfigError(f"tensor_parallel_degree={tp} does not fit this model: {problem}. "
                          f"Degrees that fit: {fits}.")
    return room // tp, ep, tp


def initialize_distributed(pipeline_config) -> None:
    """Join a multi-host job (jax.distributed) when the config names a coordinator.

    Must run before anything touches a device. An unreachable coordinator fails
    after `coordinator_timeout_s` with a ConfigError instead of hanging."""
    if pipeline_config.coordinator_address is None:
        return
    timeout_s = pipeline_config.coordinator_timeout_s
    if jax.distributed.is_initialized():
        return
    where = (f"could not join the multi-host job at coordinator_address={pipeline_config.coordinator_address!r} "
             f"as process {pipeline_config.process_id} of {pipeline_config.num_processes} within {timeout_s}s")
    if pipeline_config.process_id != 0 and not _reachable(pipeline_config.coordinator_address, timeout_s):
        # jax aborts the whole process when the coordinator never answers: check first.
        raise ConfigError(f"{where}: nothing accepts connections there. Check that process 0 is running "
                          "there and the port is reachable.")
    # CPU processes reach each other's devices through gloo (the default CPU client has no
    # cross-process collectives); GPU and TPU clients do not read this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=pipeline_config.coordinator_address,
                                   num_processes=pipeline_config.num_processes,
                                   process_id=pipeline_config.process_id,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - jax raises several types here; all mean the same to the user
        raise ConfigError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. Check that "
                          "process 0 is running there and the port is reachable.") from None


def _reachable(address: str, timeout_s: float) -> bool:
    """Whether something accepts TCP connections at "host:port" within `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def session_for(pipeline_config, **model):
    """The InferenceSession (mesh) a pipeline config asks for, for a model of these sizes
    (`plan_mesh`'s `model`)."""
    from maxlike.engine.session import InferenceSession

    if pipeline_config.compile_target:
        devices = target_devices(pipeline_config.compile_target)
        if pipeline_config.devices:  # a count: the first that many of the target's chips
            count = int(pipeline_config.devices)
            if not 1 <= count <= len(devices):
                raise ConfigError(f"devices={count} asks for more chips than compile_target="
                                  f"{pipeline_config.compile_target!r} has ({len(devices)}).")
            devices = devices[:count]
    else:
        initialize_distributed(pipeline_config)
        devices = select_devices(pipeline_config.devices)
    dp, ep, tp = plan_mesh(devices, pipeline_config.data_parallel_degree, pipeline_config.tensor_parallel_degree,
                           pipeline_config.expert_parallel_degree, **model)
    return InferenceSession(devices, data_parallel_degree=dp, tensor_parallel_degree=tp, expert_parallel_degree=ep,
                            cache_dir=executable_cache_dir(pipeline_config), target=pipeline_config.compile_target)


def executable_cache_dir(pipeline_config) -> str | None:
    """Where serialized executables live: `cache_dir`, else maxlike's cache folder; None when disabled."""
    from maxlike.cache_files import cache_root

    if not pipeline_config.executable_cache:
        return None
    return os.path.join(pipeline_config.cache_dir or cache_root(), "executables")

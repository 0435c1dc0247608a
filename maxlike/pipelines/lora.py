"""LoRA adapters: PEFT folders read and checked on the host, served from fixed device slots.

`max_num_loras` slots of rank `max_lora_rank` per targeted projection and layer live on
the device beside the base weights (an adapter of lower rank is zero-padded, its scale
folded into B). Loading, activating or evicting an adapter writes one slot through one
compiled update, so switching adapters compiles nothing. Each step row carries its slot
(0: the base model), and the graph adds every token's own update (graphs.layers.lora_delta).

Slots are pinned while requests use them (`acquire` / `release`); an adapter that needs a
slot when all are full takes the least recently used idle one, and when every slot is
pinned its requests wait.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
from dataclasses import dataclass

import jax
import numpy as np

from maxlike.config import ConfigError
from maxlike.sharding import named_sharding

from graphs.base import WeightSpec, stack_layers, stacked_specs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ConfigError):
    """An adapter that cannot be served (named field or tensor, and what to do)."""


@dataclass(frozen=True)
class Adapter:
    """One adapter read from disk: host arrays per slot weight name (one slot's shape)."""

    name: str
    path: str
    rank: int
    scale: float
    targets: tuple[str, ...]  # PEFT module names
    arrays: dict[str, np.ndarray]


def parse_spec(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); a bare path is named by its folder."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = os.path.basename(os.path.normpath(spec))
    if not name or not path:
        raise AdapterError(f"LoRA adapter {spec!r}: give it as name=path (or a folder path).")
    return name, path


def slot_specs(layer_specs: dict, lora_targets: dict, slots: int, rank: int) -> dict[str, WeightSpec]:
    """The device slots' weights, per layer and targeted projection:
    `_lora_a` [*input axes, slots, rank] and `_lora_b` [slots, rank, *output axes], sharded
    as the base weight's input and output axes are (graphs.layers.lora_delta)."""
    out = {}
    kinds = {kind: n_in for kind, n_in in lora_targets.values()}
    for name, spec in layer_specs.items():
        kind = name.rsplit(".", 1)[-1]
        if not name.startswith("layers.") or kind not in kinds:
            continue
        n_in = kinds[kind]
        out[name + "_lora_a"] = WeightSpec((*spec.shape[:n_in], slots, rank), (*spec.axes[:n_in], None, None))
        out[name + "_lora_b"] = WeightSpec((slots, rank, *spec.shape[n_in:]), (None, None, *spec.axes[n_in:]))
    return out


def read_adapter(name: str, path: str, *, layer_specs: dict, lora_targets: dict, max_rank: int,
                 kv_repeat: int = 1, dtype=np.float32) -> Adapter:
    """Read and check a PEFT LoRA folder against the base model's weights (their specs as
    the checkpoint holds them). Every problem is an AdapterError naming the field or tensor;
    nothing touches a device."""
    where = f"LoRA adapter {name!r} ({path})"
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise AdapterError(f"{where}: no {ADAPTER_CONFIG}, so this is not a PEFT adapter folder; give the folder "
                           "that `PeftModel.save_pretrained` wrote.")
    with open(config_path) as f:
        cfg = json.load(f)
    _check_config(where, cfg, lora_targets, max_rank)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        raise AdapterError(f"{where}: {ADAPTER_WEIGHTS} is missing (an adapter_model.bin is not read: save the "
                           "adapter with safe_serialization=True).")
    from safetensors.numpy import load_file

    tensors = load_file(weights_path)
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    arrays: dict[str, np.ndarray] = {}
    targets = _targets(cfg, lora_targets)
    for tensor_name, value in tensors.items():
        layer, module, part = _parse_tensor_name(where, tensor_name, lora_targets)
        if module not in targets:
            raise AdapterError(f"{where}: tensor {tensor_name} adapts {module}, which target_modules does not list.")
        kind, n_in = lora_targets[module]
        base = f"layers.{layer}.{kind}"
        if base not in layer_specs:
            raise AdapterError(f"{where}: tensor {tensor_name} is for layer {layer}, which the base model does not "
                               "have: was this adapter trained on another model?")
        spec = layer_specs[base]
        n_inputs, n_outputs = math.prod(spec.shape[:n_in]), math.prod(spec.shape[n_in:])
        want = (rank, n_inputs) if part == "A" else (n_outputs, rank)
        if tuple(value.shape) != want:
            raise AdapterError(f"{where}: tensor {tensor_name} has shape {list(value.shape)}, but the base model's "
                               f"{module} with r={rank} needs {list(want)}: was this adapter trained on another "
                               "model?")
        value = np.asarray(value, np.float32)
        if part == "A":  # [r, in] -> [*in, max_rank] (a slot of [*in, slots, max_rank])
            a = value.T.reshape(*spec.shape[:n_in], rank)
            arrays[base + "_lora_a"] = np.pad(a, [(0, 0)] * n_in + [(0, max_rank - rank)]).astype(dtype)
        else:  # [out, r] -> [max_rank, *out], scaled
            b = (value.T * scale).reshape(rank, *spec.shape[n_in:])
            if kv_repeat > 1 and "kv_heads" in spec.axes:
                b = np.repeat(b, kv_repeat, axis=1 + spec.axes.index("kv_heads") - n_in)
            arrays[base + "_lora_b"] = np.pad(b, [(0, max_rank - rank)] + [(0, 0)] * (b.ndim - 1)).astype(dtype)
    halves = {n[: -len("_lora_a")] for n in arrays if n.endswith("_lora_a")} ^ \
        {n[: -len("_lora_b")] for n in arrays if n.endswith("_lora_b")}
    if halves or not arrays:
        raise AdapterError(f"{where}: {ADAPTER_WEIGHTS} holds " + (f"only one of lora_A / lora_B for "
                           f"{sorted(halves)[:3]}" if halves else "no LoRA tensors") + ".")
    return Adapter(name, path, rank, scale, tuple(sorted(targets)), arrays)


def _targets(cfg: dict, lora_targets: dict) -> set[str]:
    found = cfg.get("target_modules")
    if found == "all-linear":
        return set(lora_targets)
    return {m.rsplit(".", 1)[-1] for m in found}


def _check_config(where: str, cfg: dict, lora_targets: dict, max_rank: int) -> None:
    def refuse(field: str, why: str) -> None:
        raise AdapterError(f"{where}: {field} {why}")

    if cfg.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", f"is {cfg.get('peft_type')!r}; maxlike serves LoRA adapters only.")
    if "r" not in cfg or not isinstance(cfg["r"], int) or cfg["r"] < 1:
        refuse("r", f"must be a positive integer, got {cfg.get('r')!r}.")
    if cfg["r"] > max_rank:
        refuse("r", f"is {cfg['r']}, above max_lora_rank={max_rank}: raise max_lora_rank (--max-lora-rank) to at "
                    f"least {cfg['r']}.")
    if cfg.get("use_dora"):
        refuse("use_dora", "is set: DoRA adapters are not supported, only plain LoRA.")
    if cfg.get("bias", "none") != "none":
        refuse("bias", f"is {cfg['bias']!r}: adapters that train biases are not supported (bias='none' only).")
    if cfg.get("modules_to_save"):
        refuse("modules_to_save", f"lists {cfg['modules_to_save']}: adapters that replace whole modules are not "
                                  "supported.")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            refuse(field, "is set: per-module ranks or alphas are not supported.")
    if cfg.get("layers_to_transform") is not None:
        refuse("layers_to_transform", "is set: adapters of some layers only are not supported.")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        refuse("target_modules", f"is the pattern {targets!r}: give a list of module names.")
    if not targets:
        refuse("target_modules", "is empty.")
    if targets != "all-linear":
        bad = sorted(_targets(cfg, lora_targets) - set(lora_targets))
        if bad:
            refuse("target_modules", f"lists {bad}, which maxlike does not adapt; supported: {sorted(lora_targets)} "
                                     "(embedding and lm_head adapters are not).")


def _parse_tensor_name(where: str, name: str, lora_targets: dict) -> tuple[int, str, str]:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'A')."""
    parts = name.split(".")
    try:
        at = parts.index("layers")
        layer, module, part = int(parts[at + 1]), parts[-3], parts[-2]
    except (ValueError, IndexError):
        layer, module, part = -1, "", ""
    if layer < 0 or module not in lora_targets or part not in ("lora_A", "lora_B") or parts[-1] != "weight":
        raise AdapterError(f"{where}: tensor {name} is not a lora_A / lora_B weight of a supported projection "
                           f"({sorted(lora_targets)}); embedding, lm_head and DoRA tensors are not supported.")
    return layer, module, part[-1]


class LoRAManager:
    """Adapters by name, served from `max_num_loras` device slots (slot 0 is the base model).

    load_adapter / unload_adapter / list_adapters manage what is registered (read from
    disk once, kept on the host); activate_adapter puts one in a device slot; the
    scheduler pins slots for the requests that use them (acquire / release).
    """

    def __init__(self, lora_config, *, layer_specs: dict, source_specs: dict, lora_targets: dict, mesh, dtype,
                 kv_repeat: int, stacked: bool, session, abstract: bool = False) -> None:
        """layer_specs: the base weights per layer as served (KV heads repeated for the mesh);
        source_specs: as the checkpoint holds them (what adapters were trained on)."""
        if not lora_targets:
            raise AdapterError("this architecture has no LoRA targets: LoRA is not supported for it.")
        self.config = lora_config
        self.max_rank, self.slots = lora_config.max_lora_rank, lora_config.max_num_loras
        self._source_specs, self._targets, self._kv_repeat = source_specs, lora_targets, kv_repeat
        self._stacked, self._session, self._dtype = stacked, session, dtype
        self._layer_slot_specs = slot_specs(layer_specs, lora_targets, self.slots, self.max_rank)
        specs = stacked_specs(self._layer_slot_specs) if stacked else self._layer_slot_specs
        self._adapters: dict[str, Adapter] = {}
        self._loads = 0  # adapters loaded so far: each load's prefix-cache namespace is its own
        self._namespace: dict[str, str] = {}
        for spec in lora_config.lora_paths:  # every adapter checked before a device slot is allocated
            self.load_adapter(spec)
        self._shardings = {name: named_sharding(mesh, spec.axes) for name, spec in specs.items()}
        if abstract:
            self.arrays = {name: jax.ShapeDtypeStruct(spec.shape, dtype, sharding=self._shardings[name])
                           for name, spec in specs.items()}
        else:
            self.arrays = {name: jax.device_put(np.zeros(spec.shape, dtype), self._shardings[name])
                           for name, spec in specs.items()}
        self._slot_of: dict[str, int] = {}  # active adapters -> their slot (1..slots)
        self._pins: collections.Counter[str] = collections.Counter()
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()  # active, least recent first

    # -- registry --------------------------------------------------------------------
    def load_adapter(self, spec: str) -> str:
        """Register an adapter from 'name=path' (or a folder path): read and checked now, placed
        in a device slot when a request first needs it. Returns its name."""
        name, path = parse_spec(spec)
        if name in self._adapters:
            raise AdapterError(f"a LoRA adapter named {name!r} is already loaded: unload it first or pick another "
                               "name.")
        self._adapters[name] = read_adapter(name, path, layer_specs=self._source_specs, lora_targets=self._targets,
                                            max_rank=self.max_rank, kv_repeat=self._kv_repeat, dtype=self._dtype)
        self._loads += 1
        self._namespace[name] = f"{name}#{self._loads}"
        return name

    def namespace(self, name: str) -> str:
        """The prefix cache's namespace for `name`: pages computed under it are shared with
        its own requests only (and not with an adapter loaded later under the same name)."""
        self._known(name)
        return self._namespace[name]

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (its slot becomes free); refused while requests use it."""
        self._known(name)
        if self._pins[name]:
            raise AdapterError(f"LoRA adapter {name!r} is in use by {self._pins[name]} request(s): unload it when "
                               "they have finished.")
        self._slot_of.pop(name, None)
        self._recent.pop(name, None)
        del self._adapters[name], self._namespace[name]

    def list_adapters(self) -> list[str]:
        return list(self._adapters)

    def _known(self, name: str) -> Adapter:
        if name not in self._adapters:
            raise AdapterError(f"unknown LoRA adapter {name!r}; loaded: {sorted(self._adapters) or 'none'}.")
        return self._adapters[name]

    # -- device slots ----------------------------------------------------------------
    def slot_of(self, name: str | None) -> int:
        """The device slot a step uses for `name` (0 for the base model); it must be active."""
        if name is None:
            return 0
        if name not in self._slot_of:
            self._known(name)
            raise AdapterError(f"LoRA adapter {name!r} is not in a device slot: activate it first "
                               "(lora_manager.activate_adapter).")
        return self._slot_of[name]

    def activate_adapter(self, name: str) -> int:
        """Put `name` in a device slot (evicting the least recently used idle adapter if every
        slot is taken) and return the slot; an AdapterError when every slot is in use."""
        slot = self.acquire(name)
        if slot is None:
            raise AdapterError(f"every one of the {self.slots} LoRA slots is in use by running requests: raise "
                               "max_num_loras (--max-num-loras) or wait for them to finish.")
        self.release(name)
        return slot

    def acquire(self, name: str) -> int | None:
        """Pin `name`'s slot for one more request, placing it first if needed; None when it
        is not active and every slot is pinned (the request waits)."""
        adapter = self._known(name)
        if name not in self._slot_of:
            taken = set(self._slot_of.values())
            free = [s for s in range(1, self.slots + 1) if s not in taken]
            if free:
                slot = free[0]
            else:
                idle = next((n for n in self._recent if not self._pins[n]), None)
                if idle is None:
                    return None
                slot = self._slot_of.pop(idle)
                del self._recent[idle]
            self._write(slot, adapter)
            self._slot_of[name] = slot
        self._pins[name] += 1
        self._recent[name] = None
        self._recent.move_to_end(name)
        return self._slot_of[name]

    def release(self, name: str) -> None:
        if self._pins[name] > 0:
            self._pins[name] -= 1

    def _write(self, slot: int, adapter: Adapter) -> None:
        """One slot's weights replaced (a target the adapter does not adapt gets zeros)."""
        new = {name: adapter.arrays.get(name, np.zeros(_without_slot(name, spec.shape, False), self._dtype))
               for name, spec in self._layer_slot_specs.items()}
        if self._stacked:
            new = stack_layers(new)
        exe = self.update_executable()
        self.arrays = exe(self.arrays, new, np.int32(slot - 1))  # slot s (1..slots) is index s - 1 of the arrays

    def update_executable(self):
        """The compiled slot update (one for the model's life: compiled at warm-up)."""
        stacked = self._stacked
        new = {name: jax.ShapeDtypeStruct(_without_slot(name, a.shape, stacked), a.dtype)
               for name, a in self.arrays.items()}
        slot = jax.ShapeDtypeStruct((), np.int32)
        return self._session.compile("lora_slot", functools.partial(_set_slot, stacked), (self.arrays, new, slot),
                                     donate_argnums=(0,), out_shardings=dict(self._shardings))


def _slot_axis(name: str, ndim: int, stacked: bool) -> int:
    """Where the slot axis is: A [(layers,) *in, S, R], B [(layers,) S, R, *out]."""
    return ndim - 2 if name.endswith("_lora_a") else int(stacked)


def _without_slot(name: str, shape: tuple, stacked: bool) -> tuple:
    axis = _slot_axis(name, len(shape), stacked)
    return shape[:axis] + shape[axis + 1:]


def _set_slot(stacked: bool, arrays: dict, new: dict, slot) -> dict:
    out = {}
    for name, a in arrays.items():
        index = (slice(None),) * _slot_axis(name, a.ndim, stacked) + (slot,)
        out[name] = a.at[index].set(new[name].astype(a.dtype))
    return out

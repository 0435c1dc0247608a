"""Mixture-of-experts MLPs (Mixtral, Qwen3-MoE): a router sends each token to its top-k experts,
each expert a SwiGLU MLP, and the token's output is their weighted sum. Routing is exact: no
capacity factor, no token dropped, so the output equals transformers'.

Expert weights are stacked per layer: "experts_gate" / "experts_up" [E, D, F], "experts_down"
[E, F, D], the leading axis the logical "expert" axis (sharded over the mesh's `expert` axis),
F the "mlp" axis (sharded over `tensor`). Checkpoints hold one tensor per expert (HF) or the
stack (llama.cpp's `ffn_*_exps`); `graphs.base.Source` stacks the former at load.

Four ways to compute the experts (`kernel`):
- "grouped": the token copies sorted by expert, then one grouped matmul per projection
  (`jax.lax.ragged_dot`), each row multiplied by its own expert's weights only.
- "dense": every expert on every token, weighted by the routing weights (zero off the top-k):
  plain einsums, the reference the others are tested against.
- "gather": each token copy gathers its expert's weights (reads only those; for a few tokens).
- "loop": the experts one after another, each that has tokens in this step on every token,
  weighted; an expert no token chose is skipped, its weights unread (`lax.cond`). XLA:CPU lowers
  ragged_dot as a masked product with every expert, so this is the CPU default (README,
  benchmarks/probe_moe_kernels.py, benchmarks/bench_moe.py).

With a mesh, the MLP runs under `shard_map`: tokens stay where they are (split over `data`,
whole on every expert and tensor device); each device computes its own experts' share of its F
columns for every token routed to them, and one all-reduce over (expert, tensor) sums the
shares. No expert weight moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from graphs.base import Source, UnsupportedConfigError, WeightSpec

EXPERT_KINDS = ("experts_gate", "experts_up", "experts_down")


@dataclass(frozen=True)
class MoESpec:
    experts: int
    top_k: int
    width: int  # each expert's intermediate size
    renormalize: bool  # the top-k weights divided by their sum (Mixtral; Qwen3-MoE's norm_topk_prob)
    layers: tuple[bool, ...]  # per layer: whether its MLP is the experts (else the dense MLP)
    hf_block: str  # where a layer keeps router and experts in HF checkpoints
    hf_experts: tuple[str, str, str]  # HF names of an expert's gate, up and down projections


def moe_from_hf(hf: Any, num_layers: int) -> MoESpec | None:
    """The experts an HF config describes (None for a dense model)."""
    model_type = getattr(hf, "model_type", "")
    if model_type == "mixtral":
        experts, width, renormalize = hf.num_local_experts, hf.intermediate_size, True
        layers = (True,) * num_layers
        names = ("block_sparse_moe", ("w1", "w3", "w2"))
    elif model_type == "qwen3_moe":
        experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
        width, renormalize = hf.moe_intermediate_size, bool(getattr(hf, "norm_topk_prob", False))
        dense, step = set(getattr(hf, "mlp_only_layers", None) or ()), getattr(hf, "decoder_sparse_step", 1) or 1
        layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        names = ("mlp", ("gate_proj", "up_proj", "down_proj"))
    else:
        return None
    top_k = hf.num_experts_per_tok
    if not experts or not 1 <= top_k <= experts:
        raise UnsupportedConfigError(f"num_experts_per_tok={top_k} with {experts} experts: the config must route each "
                                     "token to between 1 and all of the experts.")
    return MoESpec(int(experts), int(top_k), int(width), renormalize, layers, names[0], names[1])


def expert_specs(moe: MoESpec, d: int) -> dict[str, WeightSpec]:
    """One MoE layer's weights, by kind."""
    e, f = moe.experts, moe.width
    return {"router": WeightSpec((d, e), ("embed", None)),
            "experts_gate": WeightSpec((e, d, f), ("expert", "embed", "mlp")),
            "experts_up": WeightSpec((e, d, f), ("expert", "embed", "mlp")),
            "experts_down": WeightSpec((e, f, d), ("expert", "mlp", "embed"))}


def _linears(a):
    """A stack of HF [out, in] linears [E, out, in] -> ours [E, in, out]."""
    return a.transpose(0, 2, 1)


def expert_names(moe: MoESpec, i: int) -> dict[str, Source]:
    """Layer i's router and experts: HF's one tensor per expert, stacked, or llama.cpp's stacks."""
    hf, gg = f"model.layers.{i}.{moe.hf_block}.", f"blk.{i}."
    out = {"router": Source(hf + "gate.weight", gg + "ffn_gate_inp.weight", lambda a: a.T)}
    for kind, name, gguf in zip(EXPERT_KINDS, moe.hf_experts, ("gate", "up", "down")):
        out[kind] = Source(tuple(f"{hf}experts.{e}.{name}.weight" for e in range(moe.experts)),
                           f"{gg}ffn_{gguf}_exps.weight", _linears)
    return {f"layers.{i}.{kind}": source for kind, source in out.items()}


def route(x: jax.Array, router: jax.Array, moe: MoESpec) -> tuple[jax.Array, jax.Array]:
    """x [M, D] -> each token's top-k (weights [M, k] float32, experts [M, k] int32): a softmax over
    every expert's logit, its k largest, renormalized to sum to 1 where the model does."""
    probs = jax.nn.softmax(jnp.einsum("md,de->me", x, router).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, moe.top_k)
    if moe.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def _dense(x, weights, experts, gate, up, down, first):
    """Every local expert on every token, each output weighted by the token's routing weight for
    that expert (0 off its top-k). gate/up [E_local, D, F], down [E_local, F, D]; `first`: the
    global id of local expert 0. The experts are a batch axis of the products: contracting x
    with [E, D, F] directly made XLA:CPU copy every expert's weights first (37 against 6 ms for a
    16-expert layer at one token)."""
    combine = _combine(weights, experts, first, gate.shape[0])
    xe = jnp.broadcast_to(x, (gate.shape[0], *x.shape))  # [E, M, D]
    h = jax.nn.silu(jnp.einsum("emd,edf->emf", xe, gate)) * jnp.einsum("emd,edf->emf", xe, up)
    h = h * combine.T.astype(h.dtype)[:, :, None]
    return jnp.einsum("emf,efd->md", h, down)


def _combine(weights, experts, first, count):
    """[M, E_local]: each token's routing weight for each local expert (0 off its top-k)."""
    hot = jax.nn.one_hot(experts - first, count, dtype=jnp.float32)
    return jnp.sum(hot * weights[..., None], axis=1)


def _loop(x, weights, experts, gate, up, down, first):
    """Each local expert in turn, on every token, weighted; skipped when no token chose it."""
    combine = _combine(weights, experts, first, gate.shape[0]).astype(x.dtype)
    used = jnp.any(combine != 0, axis=0)

    def expert(e, out):
        def run(out):
            h = jax.nn.silu(x @ gate[e]) * (x @ up[e]) * jax.lax.dynamic_slice_in_dim(combine, e, 1, axis=1)
            return out + h @ down[e]

        return jax.lax.cond(used[e], run, lambda out: out, out)

    return jax.lax.fori_loop(0, gate.shape[0], expert, jnp.zeros_like(x))


def _gather(x, weights, experts, gate, up, down, first):
    """Each token copy through its own expert's weights, gathered ([M * k, D, F]): reads k experts
    per token, so it pays while tokens x k is small against the experts."""
    m, k = experts.shape
    count = gate.shape[0]
    local, here = _local_copies(experts, first, count)
    e = jnp.clip(local, 0, count - 1)
    xs = jnp.repeat(x, k, axis=0)  # [M * k, D]
    h = jax.nn.silu(jnp.einsum("nd,ndf->nf", xs, gate[e])) * jnp.einsum("nd,ndf->nf", xs, up[e])
    y = jnp.einsum("nf,nfd->nd", h, down[e]).reshape(m, k, -1)
    return _weighted_sum(y, weights, here)


def _grouped(x, weights, experts, gate, up, down, first):
    """The token copies routed to local experts, sorted by expert, through one grouped matmul per
    projection; the copies routed elsewhere sort last, outside every group, and weigh 0 (XLA:CPU's
    ragged_dot leaves such rows 0; the `where` keeps whatever another backend's kernel leaves there
    out of the sum)."""
    m, k = experts.shape
    count = gate.shape[0]
    local, here = _local_copies(experts, first, count)
    key = jnp.where(here, local, count)
    order = jnp.argsort(key, stable=True)  # [M * k] copies by expert
    sizes = jnp.bincount(key, length=count + 1)[:count].astype(jnp.int32)
    xs = x[order // k]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    y = jax.lax.ragged_dot(h, down, sizes)  # [M * k, D]
    y = y[jnp.argsort(order)].reshape(m, k, -1)  # back in (token, choice) order
    return _weighted_sum(y, weights, here)


def _local_copies(experts, first: int, count: int):
    """([M * k] each token copy's expert among the `count` local ones from global id `first`,
    [M * k] whether that expert is local)."""
    local = experts.reshape(-1) - first
    return local, (local >= 0) & (local < count)


def _weighted_sum(y, weights, here):
    """y [M, k, D], each token's k copies, summed with their routing weights; copies whose expert
    is not local weigh 0."""
    w = jnp.where(here, weights.reshape(-1), 0.0).reshape(weights.shape)
    return jnp.einsum("mkd,mk->md", y, w.astype(y.dtype))


KERNELS = {"grouped": _grouped, "dense": _dense, "gather": _gather, "loop": _loop}  # `kernel` name -> function


@dataclass(frozen=True)
class ExpertRun:
    """How a forward pass runs its experts: `kernel` (KERNELS) and the mesh (None: one device, no
    shard_map)."""

    kernel: str = "grouped"
    mesh: Any = None


def moe_mlp(x: jax.Array, lw: dict, moe: MoESpec, run: ExpertRun | None = None) -> jax.Array:
    """The MoE MLP of a normed input x [rows, T, D] (rows split over the mesh's `data` axis)."""
    run = run or ExpertRun()
    if run.kernel not in KERNELS:
        raise ValueError(f"unknown MoE kernel {run.kernel!r}: use one of {tuple(KERNELS)}.")
    compute = KERNELS[run.kernel]

    def body(x, router, gate, up, down):
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = route(flat, router, moe)
        first = 0 if run.mesh is None else jax.lax.axis_index("expert") * gate.shape[0]
        y = compute(flat, weights, experts, gate, up, down, first)
        if run.mesh is not None:
            y = jax.lax.psum(y, ("expert", "tensor"))
        return y.reshape(x.shape)

    args = (x, lw["router"], lw["experts_gate"], lw["experts_up"], lw["experts_down"])
    if run.mesh is None:
        return body(*args)
    stacked = P("expert", None, "tensor")
    return jax.shard_map(body, mesh=run.mesh, in_specs=(P("data"), P(), stacked, stacked, P("expert", "tensor")),
                         out_specs=P("data"), check_vma=False)(*args)

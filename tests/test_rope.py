"""RoPE variants against transformers' own rope functions: frequencies, the cos/sin scaling, and
the rotation applied to a tensor; bad rope configs are errors naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

HEAD_DIM = 64
LONG = [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)]
SHORT = [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)]
VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                    "mscale_all_dim": 0.8, "beta_fast": 16, "original_max_position_embeddings": 256},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": LONG, "short_factor": SHORT,
                 "original_max_position_embeddings": 256},
    "partial": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    "yarn partial": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "partial_rotary_factor": 0.5,
                     "original_max_position_embeddings": 256},
}


def _hf_config(params: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                       max_position_embeddings=1024, rope_parameters=dict(params))


def _hf_frequencies(cfg, seq_len: int):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":  # Phi-3's default honours partial_rotary_factor (Llama's has none)
        inv, scale = Phi3RotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)
    return inv.numpy(), scale


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("length", [200, 1024, 3000])  # inside the original context, at the maximum, past it
def test_frequencies_equal_transformers(name, length):
    from graphs.rope import rope_from_hf

    cfg = _hf_config(VARIANTS[name])
    ours = rope_from_hf(cfg.rope_parameters, HEAD_DIM, cfg.max_position_embeddings, "test")
    inv, scale = ours.__class__(**{**ours.__dict__, "length": length}).frequencies()
    ref_inv, ref_scale = _hf_frequencies(cfg, length)
    np.testing.assert_allclose(inv, ref_inv, rtol=2e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-7)


def test_the_variants_differ():
    """So the comparisons above can fail: every variant's frequencies differ from the default."""
    from graphs.rope import rope_from_hf

    base = rope_from_hf(VARIANTS["default"], HEAD_DIM, 1024, "test").frequencies()[0]
    for name, params in VARIANTS.items():
        if name not in ("default", "dynamic"):
            inv = rope_from_hf(params, HEAD_DIM, 1024, "test").frequencies()[0]
            assert inv.shape != base.shape or not np.allclose(inv, base), name
    dynamic = rope_from_hf(VARIANTS["dynamic"], HEAD_DIM, 1024, "test")
    short, long = (dynamic.__class__(**{**dynamic.__dict__, "length": n}).frequencies()[0] for n in (1024, 3000))
    assert not np.allclose(short, long), "dynamic NTK grows its base past max_position_embeddings"


@pytest.mark.parametrize("name", ["yarn", "longrope", "llama3"])
def test_rotation_equals_transformers(name):
    """apply_rope against HF's rotary embedding (cos and sin with their scaling) and apply_rotary_pos_emb."""
    import jax.numpy as jnp
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from graphs.rope import apply_rope, rope_from_hf

    cfg = _hf_config(VARIANTS[name])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, HEAD_DIM)).astype(np.float32)  # [B, T, H, D]
    positions = np.array([[0, 1, 2, 3, 4], [100, 101, 102, 500, 900]])
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.tensor(positions))
    ref, _ = apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.tensor(x).transpose(1, 2), cos, sin)
    ours = apply_rope(jnp.asarray(x), jnp.asarray(positions),
                      rope_from_hf(cfg.rope_parameters, HEAD_DIM, cfg.max_position_embeddings, "test"))
    # Both sides round the inverse frequencies to float32 on their own (within 2e-6 of each other:
    # test_frequencies_equal_transformers); transformers 5.24 rounds llama3's a few ulps away from
    # ours. At position p an ulp of a frequency turns the angle by up to p ulps, so the bound grows with p.
    err = np.abs(np.asarray(ours) - ref.transpose(1, 2).numpy())
    bound = 2e-5 + 4 * np.finfo(np.float32).eps * positions[:, :, None, None] * np.abs(x).max()
    assert (err <= bound).all(), f"{err.max()} at {np.unravel_index(np.argmax(err - bound), err.shape)}"


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "su-per"}, "rope_type='su-per' (test) is not built: maxlike runs default, linear, dynamic, "
                              "llama3, yarn, longrope"),
    ({"rope_type": "yarn", "factor": 2.0}, "rope_type='yarn' needs original_max_position_embeddings"),
    ({"rope_type": "default", "partial_rotary_factor": 0.3}, "partial_rotary_factor=0.3 (test) rotates 19 of 64 "
                                                             "head dims: it must be an even number from 2 to head_dim"),
])
def test_bad_rope_configs_name_the_field(params, message):
    from graphs.base import UnsupportedConfigError
    from graphs.rope import rope_from_hf

    with pytest.raises(UnsupportedConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rope_from_hf(params, HEAD_DIM, 1024, "test")


def test_partial_rotation_equals_transformers():
    """Phi-3's rotation with partial_rotary_factor (Phi-4-mini): the leading dims turn, the rest pass."""
    import jax.numpy as jnp
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    from graphs.rope import apply_rope, rope_from_hf

    cfg = Phi3Config(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=1024,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    x = np.random.default_rng(1).standard_normal((2, 5, 3, HEAD_DIM)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 30, 31, 200, 900]])
    cos, sin = Phi3RotaryEmbedding(cfg)(torch.zeros(1), torch.tensor(positions))
    ref, _ = apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.tensor(x).transpose(1, 2), cos, sin)
    rope = rope_from_hf(cfg.rope_parameters, HEAD_DIM, 1024, "test")
    assert rope.rotary_dim == 48
    ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), rope))
    np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), atol=2e-5)
    np.testing.assert_array_equal(ours[..., 48:], x[..., 48:])

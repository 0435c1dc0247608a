"""PipelineConfig: flat keyword routing, validation messages, the seed's Mistral example."""

from __future__ import annotations

import pytest

from maxlike.config import ConfigError
from maxlike.pipelines import (
    KVCacheConfig,
    PipelineConfig,
    upper_bounded_default,
)


def test_flat_keywords_route_to_their_subconfig(tiny_llama):
    c = PipelineConfig(model_path=tiny_llama[0], max_length=64, kv_cache_page_size=32, max_batch_size=2,
                       enable_echo=True, dtype="float32")
    assert c.model.model_path == tiny_llama[0] and c.model.max_length == 64 and c.model.dtype == "float32"
    assert c.kv_cache.kv_cache_page_size == 32
    assert c.sampling.enable_echo is True
    assert c.max_batch_size == 2
    c2 = PipelineConfig(model_path=tiny_llama[0], kv_cache=KVCacheConfig(kv_cache_page_size=8))
    assert c2.kv_cache.kv_cache_page_size == 8
    assert c.replace(max_length=32).model.max_length == 32
    with pytest.raises(AttributeError):
        c.max_batch_size = 3  # frozen


def test_quantization_encoding_sets_dtype(tiny_llama):
    assert PipelineConfig(model_path=tiny_llama[0], quantization_encoding="bfloat16").model.dtype == "bfloat16"
    for unbuilt in ("gptq",):
        with pytest.raises(ConfigError, match=f"quantization_encoding='{unbuilt}' is not built yet: use one of"):
            PipelineConfig(model_path=tiny_llama[0], quantization_encoding=unbuilt)
    with pytest.raises(ConfigError, match="quantization_encoding='int4' is not supported: use one of"):
        PipelineConfig(model_path=tiny_llama[0], quantization_encoding="int4")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_lenght": 5}, "unknown field 'max_lenght'. Did you mean max_length"),
    ({"max_length": 0}, "max_length must be a positive integer"),
    ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
    ({"max_num_steps": 0}, "max_num_steps must be a positive integer"),
    ({"kv_cache_page_size": 12}, "kv_cache_page_size must be a power of two"),
    ({"device_memory_utilization": 1.5}, r"device_memory_utilization must be in \(0, 1\]"),
    ({"dtype": "int4"}, "dtype='int4' is not supported"),
    ({"compile_target": "tpu:v5e:2x2"}, "compile_target='tpu:v5e:2x2' needs compile_only=True"),
    ({"compile_target": "tpu:v5e:2x2", "compile_only": True, "devices": "0,2"},
     "compile_target and devices=.0,2. exclude each other"),
])
def test_invalid_values_are_named(tiny_llama, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig(model_path=tiny_llama[0], **kwargs)


def test_model_path_missing_or_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="model_path is required"):
        PipelineConfig(max_length=5)
    with pytest.raises(ConfigError, match="does not exist: pass a Hugging Face model directory"):
        PipelineConfig(model_path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="is not a model: the directory has no config.json"):
        PipelineConfig(model_path=str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="a file must be a .gguf"):
        PipelineConfig(model_path=str(tmp_path / "weights.bin"))


def test_lora_settings_are_checked(tiny_llama):
    with pytest.raises(ConfigError, match="lora_paths were given but LoRA is off: pass enable_lora=True"):
        PipelineConfig(model_path=tiny_llama[0], lora_paths=("a=/x",))
    with pytest.raises(ConfigError, match="max_lora_rank must be a positive integer, got 0"):
        PipelineConfig(model_path=tiny_llama[0], enable_lora=True, max_lora_rank=0)
    with pytest.raises(ConfigError, match="max_num_loras must be a positive integer"):
        PipelineConfig(model_path=tiny_llama[0], enable_lora=True, max_num_loras=-1)


def test_upper_bounded_default_has_max_semantics():
    assert upper_bounded_default(upper_bound=100, default=None) == 100
    assert upper_bounded_default(upper_bound=100, default=40) == 40
    with pytest.raises(ValueError, match="exceeds the upper bound"):
        upper_bounded_default(upper_bound=100, default=101)


def test_calculate_max_seq_len_is_the_seeds_upper_bounded_default(tiny_models):
    """DecoderPipelineModel.calculate_max_seq_len follows the seed's Mistral example: the configured
    max_length when it is within the model's limit, the limit when none is given, an error above it."""
    from maxlike.pipelines import DecoderPipelineModel
    from maxlike.weights import load_hf_config

    path = tiny_models["mistral"][0]
    hf = load_hf_config(path)  # max_position_embeddings=256
    calc = DecoderPipelineModel.calculate_max_seq_len
    assert calc(PipelineConfig(model_path=path, max_length=100), hf) == 100
    assert calc(PipelineConfig(model_path=path), hf) == 256
    assert calc(PipelineConfig(model_path=path, max_length=256), hf) == 256
    with pytest.raises(ValueError, match=r"max_length \(300\) exceeds the model's limit "
                                         r"\(max_position_embeddings=256\)"):
        calc(PipelineConfig(model_path=path, max_length=300), hf)
    # What the seed's example reads exists under those names.
    config = PipelineConfig(model_path=path, max_length=100)
    assert (config.model.max_length, config.model.model_path) == (100, path)


def test_fused_projections_default_per_backend_and_weights(tiny_llama):
    """Unset, fusion follows the backend's measured default: CPU always, TPU never, GPU for float
    weights only (the H200 figure is for bf16; quantized fused is unmeasured there). Set, it is kept."""
    from maxlike.pipelines import layout

    config = PipelineConfig(model_path=tiny_llama[0])
    expected = {("cpu", False): True, ("cpu", True): True, ("tpu", False): False, ("tpu", True): False,
                ("gpu", False): True, ("gpu", True): False}
    for (platform, quantized), fused in expected.items():
        assert layout.fuse_projections(config, platform, quantized) is fused, (platform, quantized)
    for value in (True, False):
        explicit = config.replace(fuse_projections=value)
        assert all(layout.fuse_projections(explicit, p, q) is value for p, q in expected)

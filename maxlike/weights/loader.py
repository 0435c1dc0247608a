"""Format detection, HF config / tokenizer loading, and the common read path."""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from maxlike.cache_files import cache_root, read_json, write_json
from maxlike.weights import gguf_file, quantize, safetensors_dir
from maxlike.weights.errors import WeightsError


def weights_format(model_path: str) -> str:
    return "gguf" if model_path.endswith(".gguf") else "safetensors"


def _identity(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def load_hf_config(model_path: str) -> Any:
    """The HF config; for GGUF, transformers builds it from the file's metadata."""
    return _hf_files(*_identity(model_path))[0]


def load_tokenizer(model_path: str) -> Any:
    """The tokenizer (with its chat template); for GGUF, from the file's metadata."""
    return _hf_files(*_identity(model_path))[1]()


@functools.lru_cache(maxsize=8)
def _hf_files(model_path: str, mtime_ns: int, size: int) -> tuple[Any, Any]:
    """(config, tokenizer loader) for one file identity.

    GGUF metadata takes transformers seconds to parse (about 16 s for
    SmolLM2's config and tokenizer), so the first load of a GGUF writes both
    in HF format under the cache folder and later loads read that copy. Warm
    loads avoid importing transformers at all (see `maxlike.weights.lean`).
    """
    from maxlike.weights.lean import LeanTokenizer

    where, kw = model_path, {}
    if weights_format(model_path) == "gguf":
        where = _gguf_as_hf_dir(model_path, mtime_ns, size)
        if where is None:  # no writable cache: read the GGUF itself
            where, kw = os.path.dirname(model_path), {"gguf_file": os.path.basename(model_path)}
    config = _config(where, kw, model_path)

    def tokenizer() -> Any:
        lean = None if kw else LeanTokenizer.load(where)
        if lean is not None:
            return lean
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(where, **kw)
        except Exception as e:
            raise WeightsError(
                f"could not load a tokenizer from {model_path!r} ({e}). An HF directory needs tokenizer files "
                "(tokenizer.json or tokenizer.model); a GGUF file needs tokenizer.ggml.* metadata."
            ) from e

    return config, tokenizer


def _transformers_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformers")  # without importing it (seconds)


def _config(where: str, kw: dict, model_path: str) -> Any:
    """The HF config: transformers' AutoConfig the first time, then its every field kept as
    JSON under the cache folder and read back as an HFConfigView (no transformers import)."""
    import hashlib

    from maxlike.weights.lean import HFConfigView

    saved = None
    if not kw and os.path.isfile(os.path.join(where, "config.json")):
        path, mtime_ns, size = _identity(os.path.join(where, "config.json"))
        key = hashlib.sha256(f"{path}|{mtime_ns}|{size}|{_transformers_version()}".encode()).hexdigest()[:24]
        saved = os.path.join(cache_root(), "hf-config", key + ".json")
        values = read_json(saved)
        if values is not None:
            return HFConfigView(values)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(where, **kw)
    except Exception as e:  # transformers raises many kinds; all mean "not a usable config"
        raise WeightsError(f"could not read the model config from {model_path!r}: {e}") from e
    values = json.loads(json.dumps(config.to_dict(), default=str))  # exactly what a warm load reads back
    if saved is not None:
        try:
            write_json(saved, values)
        except OSError:  # a read-only cache folder: the next load parses the config again
            pass
    return HFConfigView(values)


GGUF_CONVERSION = 3  # part of the converted folder's key: bump it when the conversion changes


def _gguf_as_hf_dir(model_path: str, mtime_ns: int, size: int) -> str | None:
    """The GGUF's config and tokenizer as an HF folder under the cache (written on first use;
    None when the cache cannot be written)."""
    import hashlib

    from maxlike.weights import gguf_hf

    identity = f"{model_path}|{mtime_ns}|{size}|{_transformers_version()}|{GGUF_CONVERSION}"
    folder = os.path.join(cache_root(), "gguf-hf", hashlib.sha256(identity.encode()).hexdigest()[:24])
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    reader = gguf_file.check_file(model_path)  # a clear error beats transformers' on a bad file
    tmp = f"{folder}.tmp{os.getpid()}"
    try:
        written = gguf_hf.write_hf_folder(reader, tmp)  # config.json last: it marks a complete copy
        if written is None:
            _write_hf_folder_with_transformers(model_path, tmp)
        elif written == "config":
            _write_tokenizer_with_transformers(model_path, tmp)
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):  # another process may have won the race
            return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_hf_folder_with_transformers(model_path: str, folder: str) -> None:
    """transformers' GGUF reader (the files `gguf_hf` does not convert): it imports torch."""
    from transformers import AutoConfig

    where, name = os.path.dirname(model_path), os.path.basename(model_path)
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except Exception as e:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise WeightsError(
                f"reading {model_path!r} the first time needs torch: transformers' GGUF reader, which maxlike uses "
                "for this GGUF's config and tokenizer, imports it. Install its CPU build (pip install torch "
                "--index-url https://download.pytorch.org/whl/cpu) or load an HF directory instead; later loads "
                "use a cached copy and need no torch.") from e
        raise WeightsError(f"could not read the model config from {model_path!r}: {e}") from e
    _write_tokenizer_with_transformers(model_path, folder)
    config.save_pretrained(folder)


def _write_tokenizer_with_transformers(model_path: str, folder: str) -> None:
    from transformers import AutoTokenizer

    where, name = os.path.dirname(model_path), os.path.basename(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception:  # a GGUF without tokenizer metadata still runs at the PipelineModel level
        tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def read_weights(
    model_path: str, specs: Mapping[str, Any], names: Mapping[str, Any], dtype: Any, *, progress: bool = True,
    weight_path: tuple[str, ...] = (), keep: dict[str, tuple[Any, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Read, convert and cast every weight in `specs` (graphs.WeightSpec: our shape) from the
    checkpoint tensors `names` maps it to (graphs.Source) into host arrays of `dtype`.

    `weight_path` names the checkpoint files explicitly (safetensors files, or
    one .gguf), relative to `model_path`'s folder; by default they are found
    in `model_path`. The whole checkpoint is validated first (headers, sizes,
    types, names).

    `keep` = {projection name: (Encoding, input axes)} (maxlike.weights.quantize): GGUF
    projections whose blocks their encoding stores exactly come back already quantized, as
    `name` plus its scale (and offset) arrays, in our layout.
    """
    fmt = weights_format(model_path)
    files = checkpoint_files(model_path, weight_path)
    if fmt == "gguf":
        reader = gguf_file.open_checked(files[0])
    else:
        reader = safetensors_dir.open_checked(model_path, files)
    source_names = {name: (names[name].gguf_name if fmt == "gguf" else _in_checkpoint(names[name].hf_name, reader))
                    for name in specs}
    missing = [src for srcs in source_names.values() for src in ((srcs,) if isinstance(srcs, str) else srcs)
               if src not in reader]
    if missing:
        raise WeightsError(
            f"{model_path!r} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}: "
            "the checkpoint does not match its config (wrong architecture or an incomplete download)."
        )
    out: dict[str, np.ndarray] = {}
    kept = keep if keep is not None and fmt == "gguf" else {}
    for name, spec in tqdm(specs.items(), desc="loading weights", unit="tensor", disable=not progress):
        source = names[name]
        parts = None
        if name in kept and reader.quant_type(source_names[name]) in kept[name][0].kept_gguf:
            parts = _kept(reader.read_blocks(source_names[name]), source, kept[name][1], kept[name][0], name)
            arr = parts[name]
        else:
            arr = _read(reader, source_names[name])
            if fmt == "gguf" and source.gguf_convert is not None:
                arr = source.gguf_convert(arr)
            arr = source.convert(arr)
        if tuple(arr.shape) != tuple(spec.shape):
            raise WeightsError(
                f"tensor {source_names[name]!r} in {model_path!r} has shape {arr.shape} after conversion, "
                f"expected {spec.shape} from the config: the checkpoint does not match its config."
            )
        if parts is not None:
            out.update(parts)
        else:
            out[name] = np.ascontiguousarray(arr, dtype=dtype)
    return out


def _read(reader, names: str | tuple[str, ...]) -> np.ndarray:
    """One tensor, or several stacked on a new leading axis (graphs.Source's tuple of HF names)."""
    return reader.read(names) if isinstance(names, str) else np.stack([reader.read(n) for n in names])


def _in_checkpoint(names: str | tuple[str, ...], reader) -> str | tuple[str, ...]:
    return _text_tower(names, reader) if isinstance(names, str) else tuple(_text_tower(n, reader) for n in names)


def _kept(parts: dict[str, np.ndarray], source, n_in: int, enc, name: str) -> dict[str, np.ndarray]:
    """One GGUF projection kept quantized: its parts through the weight's conversion, named."""
    def convert(a):
        return source.convert(a if source.gguf_convert is None else source.gguf_convert(a))

    return {name + suffix: a for suffix, a in quantize.in_layout(parts, convert, n_in, enc).items()}


# Where a multimodal checkpoint (Gemma 3, ...) keeps its language model's tensors: under the
# language_model prefix, as transformers 5 saves them ("model.language_model.layers...") or as
# older checkpoints on the Hub do ("language_model.model.layers...").
_TEXT_TOWER = (("model.", ("model.language_model.", "language_model.model.")),
               ("lm_head.", ("language_model.lm_head.",)))


def _text_tower(name: str, reader) -> str:
    """An HF tensor name as the checkpoint has it: itself, or where a multimodal checkpoint keeps it."""
    if name in reader:
        return name
    for prefix, places in _TEXT_TOWER:
        if name.startswith(prefix):
            for place in places:
                if place + name[len(prefix):] in reader:
                    return place + name[len(prefix):]
    return name


def resolve_encoding(model_config, platform: str) -> str | None:
    """The encoding a model runs in: `quantization_encoding` when set, else for a GGUF on an
    accelerator the one that keeps its projections' blocks (None: the model's float dtype)."""
    if model_config.quantization_encoding is not None or not quantize.KEEP_GGUF_BLOCKS.get(platform, False):
        return model_config.quantization_encoding
    if weights_format(model_config.model_path) != "gguf":
        return None
    reader = gguf_file.check_file(checkpoint_files(model_config.model_path, model_config.weight_path)[0])
    sizes: dict[str, int] = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.endswith(quantize.GGUF_PROJECTIONS):
            sizes[t.tensor_type.name] = sizes.get(t.tensor_type.name, 0) + int(t.n_elements)
    return quantize.GGUF_ENCODING.get(max(sizes, key=sizes.get)) if sizes else None


def resolve_encodings(model_config, platform: str, specs: dict, names: dict, lora_targets: dict) -> dict[str, str]:
    """{projection kind: encoding name} the model runs in ({}: float). `quantization_encoding` set:
    every kind in it. Unset, a GGUF on an accelerator keeps its blocks: each kind runs in the most
    precise encoding (quantize.PRECISION) among its layers' block types, so a Q4_K_M file keeps its
    Q6_K attn_v and ffn_down as q6_k and the rest as q4_k; a kind none of whose types has an
    encoding (F16, Q5_K, ...) runs in the one most of the file's projections are in.
    specs, names: the per-layer weight specs and their checkpoint names (graphs.Source)."""
    kinds = sorted({kind for kind, _ in lora_targets.values()})
    model = resolve_encoding(model_config, platform)
    if model_config.quantization_encoding is not None or model is None:
        return {kind: model for kind in kinds} if model in quantize.ENCODINGS else {}
    reader = gguf_file.check_file(checkpoint_files(model_config.model_path, model_config.weight_path)[0])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    found: dict[str, set] = {kind: set() for kind in kinds}
    for name in quantize.linear_inputs(specs, {kind: 0 for kind in kinds}):
        sources = names[name].gguf_name
        for source in (sources,) if isinstance(sources, str) else sources:
            if types.get(source) in quantize.GGUF_ENCODING:
                found[quantize.kind_of(name)].add(quantize.GGUF_ENCODING[types[source]])
    return {kind: max(found[kind], key=quantize.PRECISION.index) if found[kind] else model for kind in kinds}


def checkpoint_files(model_path: str, weight_path: tuple[str, ...] = ()) -> list[str]:
    """The files the weights are read from: `weight_path` (relative to `model_path`'s folder) when
    given, else the .gguf itself; for a safetensors directory with no weight_path, [] (its index or
    its *.safetensors files are found when it is opened)."""
    gguf = weights_format(model_path) == "gguf"
    folder = os.path.dirname(os.path.abspath(model_path)) if gguf else model_path
    files = [p if os.path.isabs(p) else os.path.join(folder, p) for p in weight_path]
    if gguf:
        if len(files) > 1:
            raise WeightsError(f"a GGUF model reads one file; weight_path names {len(files)}.")
        return files or [model_path]
    return files

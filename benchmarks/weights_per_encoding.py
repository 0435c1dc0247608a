"""Bytes of weights a model holds per encoding and `quantized_matmul`, per backend, from its config alone
(nothing is read or allocated): `DecoderPipelineModel.weights_size_on`, which follows the encodings and
the LM head held in q8_0 where the Pallas matmul reads it. Also what a batch-1 decode step reads of
them: all but an embedding table that is not the head itself (untied, or beside a q8_0 head, then
held in q8_0 by rows), of which one row.

    .venv/bin/python benchmarks/weights_per_encoding.py [--shapes llama-1b llama-8b] [--platforms gpu tpu]
        [--setups bfloat16:xla int8:xla int8:pallas q8_0:pallas q4_k:xla q4_k:pallas] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gpu_decode import SHAPES  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402
from maxlike.pipelines.decoder import DecoderPipelineModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-8b"], choices=sorted(SHAPES))
    ap.add_argument("--platforms", nargs="+", default=["gpu", "tpu"])
    ap.add_argument("--setups", nargs="+", default=["bfloat16:xla", "int8:xla", "int8:pallas", "q8_0:pallas",
                                                    "q4_k:xla", "q4_k:pallas"], help="encoding:quantized_matmul")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    import transformers as tf

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            path = os.path.join(folder, shape)
            tf.LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape]).save_pretrained(path)
            for platform in args.platforms:
                for setup in args.setups:
                    encoding, matmul = setup.split(":")
                    config = PipelineConfig(model_path=path, dtype="bfloat16", quantization_encoding=encoding,
                                            quantized_matmul=matmul)
                    size = DecoderPipelineModel.weights_size_on(config, platform)
                    v, d = SHAPES[shape]["vocab_size"], SHAPES[shape]["hidden_size"]
                    q8_0_head = matmul == "pallas" and encoding != "bfloat16"
                    apart = q8_0_head or not SHAPES[shape]["tie_word_embeddings"]
                    row = d + d // 32 * 2 if q8_0_head else d * 2  # q8_0 (a float16 scale per 32) or bf16
                    read = size - (v - 1) * row if apart else size  # of the embedding table, one row
                    rows.append(dict(shape=shape, platform=platform, encoding=encoding, quantized_matmul=matmul,
                                     weight_mb=round(size / 1e6, 1), step_reads_mb=round(read / 1e6, 1)))
                    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

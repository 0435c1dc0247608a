"""`maxlike benchmark --roofline`: the bytes and FLOPs it counts against formulas written out here
from the HF model's own parameter count, and the report end to end on the tiny model."""

from __future__ import annotations

import json

import pytest

from conftest import build_model


def test_counts_follow_the_model(tiny_models):
    from maxlike.entrypoints import roofline as rl

    path, hf = tiny_models["llama"]
    model = build_model(path)
    c = hf.config
    params = sum(p.numel() for p in hf.parameters())
    table = c.vocab_size * c.hidden_size  # untied: lm_head is read whole, the embeddings a row per token
    assert rl.weight_bytes(model) == 4 * (params - table + c.hidden_size)  # fp32
    assert rl.weight_bytes(model, 3) == 4 * (params - table + 3 * c.hidden_size)
    tied_path, tied_hf = tiny_models["llama_tied"]  # the tied table is the head: read whole
    assert rl.weight_bytes(build_model(tied_path), 3) == 4 * sum(p.numel() for p in tied_hf.parameters())
    assert rl.matmul_flops_per_token(model) == 2 * (params - c.vocab_size * c.hidden_size)  # the embedding is a gather
    # q4_k: the same matmuls; 4 bits per projection weight plus a float16 scale and offset per 32 of them
    q4 = build_model(path, quantization_encoding="q4_k")
    projections = sum(p.numel() for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    assert rl.matmul_flops_per_token(q4) == rl.matmul_flops_per_token(model)
    rest = 4 * (params - table + c.hidden_size - projections)
    assert rl.weight_bytes(q4) == rest + projections // 2 + 2 * 2 * projections // 32
    # q6_k: 6 bits per projection weight plus a float16 scale per 16 of them
    q6 = build_model(path, quantization_encoding="q6_k")
    assert rl.weight_bytes(q6) == rest + projections * 3 // 4 + 2 * projections // 16
    head_dim = c.hidden_size // c.num_attention_heads
    assert rl.kv_bytes(model, 3, 50) == 2 * c.num_hidden_layers * 3 * 50 * c.num_key_value_heads * head_dim * 4
    assert rl.attention_flops(model, 10, 20) == 4 * c.num_hidden_layers * 10 * 20 * c.num_attention_heads * head_dim

    peaks = rl.Peaks(bandwidth_gb_s=20.0, matmul_tflop_s=0.5)
    [row] = rl.report(model, peaks, [{"batch": 2, "decode_tok_s": 100.0, "prefill_tok_s": 400.0}], 8, 4)
    step = 4 * (params - table + 2 * c.hidden_size) + rl.kv_bytes(model, 2, 8 + 2)  # weights once, each row's context
    assert row["step_bytes"] == step
    assert row["decode_gb_s"] == pytest.approx(step * 50 / 1e9)  # 100 tok/s over 2 rows: 50 steps per second
    assert row["decode_roofline_share"] == pytest.approx(step * 50 / 1e9 / 20.0)
    assert row["decode_roofline_tok_s"] == pytest.approx(2 * 20e9 / step)
    flops = 2 * (params - c.vocab_size * c.hidden_size) * 8 + rl.attention_flops(model, 8, 8) // 2
    assert row["prefill_tflop_s"] == pytest.approx(flops * 400 / 8 / 1e12)


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_the_report_end_to_end(tiny_llama, tmp_path, capsys):
    from test_cli import cli

    out = tmp_path / "roofline.json"
    rc, stdout, err = cli(capsys, "benchmark", "--model-path", tiny_llama[0], "--roofline", "--json", str(out),
                          "--batch-sizes", "1", "2", "--max-new-tokens", "4", "--prompt-tokens", "8",
                          "--max-length", "64", "--max-batch-size", "2")
    assert rc == 0, err
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    assert rows[0]["peaks"]["bandwidth_gb_s"] > 0 and rows[0]["peaks"]["matmul_tflop_s"] > 0
    assert all(r["decode_gb_s"] > 0 and r["prefill_tflop_s"] > 0 for r in rows)
    assert "device peaks: memory" in stdout and "% of memory bandwidth" in stdout and "% of matmul peak" in stdout

"""Two fake CPU devices (own process: XLA flags must precede jax's import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    from conftest import build_model, random_prompt
    from maxlike.engine import InferenceSession
    from maxlike.pipelines import DecoderPipelineModel, PipelineConfig, ReturnLogits, TextContext

    logits = []
    for devices in (jax.devices()[:1], jax.devices()[:2]):
        session = InferenceSession(devices)
        cfg = PipelineConfig(model_path=sys.argv[2], max_length=128, max_batch_size=2)
        m = DecoderPipelineModel(cfg, session, session.devices, cfg.kv_cache, None, None,
                                 ReturnLogits.LAST_TOKEN, progress=False)
        out = m.execute(m.prepare_initial_token_inputs([[TextContext("a", random_prompt(9, 1), 20)]]))
        logits.append(np.asarray(out.next_token_logits))
        print("signal_buffers", len(m.signal_buffers), [b.devices() for b in m.signal_buffers])
    print("max_err", float(np.abs(logits[0] - logits[1]).max()))
""")


def test_two_devices_tensor_parallel_and_signal_buffers(tiny_llama):
    r = subprocess.run([sys.executable, "-c", SCRIPT, os.path.dirname(__file__), tiny_llama[0]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("signal_buffers 0 ")  # one device: none
    assert lines[1].startswith("signal_buffers 2 ")  # one per device
    assert float(lines[2].split()[1]) < 1e-5, "tensor parallel 2 equals one device"

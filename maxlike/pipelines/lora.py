"""LoRA adapters: not built yet.

`PipelineModel.lora_manager` is None while LoRA is disabled (as in MAX);
asking for LoRA fails at config time with a clear NotImplementedError.
"""

from __future__ import annotations


class LoRAManager:
    def __init__(self, lora_config) -> None:
        raise NotImplementedError("LoRA adapters are not built yet in maxlike; leave enable_lora False.")

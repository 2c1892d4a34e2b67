"""vllm.lora.request.LoRARequest, as lm-eval imports it (the stand-in never loads adapters)."""
from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

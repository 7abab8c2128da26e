"""lorafleet: fine-tune open LLMs with LoRA / QLoRA / freeze / full / P-tuning and serve many adapters."""

__version__ = "0.1.0"

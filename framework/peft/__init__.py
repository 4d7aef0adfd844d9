"""The LoRA family (LoRA, rsLoRA, DoRA, PiSSA, QLoRA, LoRA+) as weight pytrees lm.Linear runs directly, trained on
the one training loop with `adapter_task`. `hf.save_hf_checkpoint` exports an adapted model merged (`merge`)."""

from framework.peft.checkpoint import load_adapters, save_adapters
from framework.peft.lora import (
    LoraConfig,
    LoraWeight,
    adapter_params,
    add_adapters,
    count_params,
    merge,
    set_adapters,
    unmerge,
)
from framework.peft.optim import adapter_labels, lora_plus
from framework.peft.train import adapter_task

__all__ = [
    "LoraConfig",
    "LoraWeight",
    "adapter_labels",
    "adapter_params",
    "adapter_task",
    "add_adapters",
    "count_params",
    "load_adapters",
    "lora_plus",
    "merge",
    "save_adapters",
    "set_adapters",
    "unmerge",
]

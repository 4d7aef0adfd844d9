"""Adapter training on the one training loop: an LM `loop.Task` turned into one that trains only the adapters.

  adapted = add_adapters(base, LoraConfig(rank=8, alpha=16), rng, model_cfg=cfg)
  task = adapter_task(lm_task, adapted, optimizer=lora_plus(schedule), lr_schedule=schedule)
  state = loop.train(config, workdir, task)             # checkpoints hold the adapters and their optimiser state
  merged = merge(set_adapters(adapted, state.params))   # plain params for inference

The adapted params (the frozen base with its `LoraWeight` wrappers) are the task's frozen input: passed to the
loss beside the adapters, never differentiated, updated or checkpointed (a resumed run re-creates them, and the
loop warns if they differ from the checkpointed run's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from framework.peft.lora import adapter_params, set_adapters
from framework.training import loop


def adapter_task(
    task: loop.Task,
    adapted: Any,
    *,
    optimizer: optax.GradientTransformation | None = None,
    lr_schedule: optax.Schedule | None = None,
) -> loop.Task:
    """`task` (a loss, batches and eval over plain LM params) training only the adapters of `adapted`.

    `adapted`: params from `add_adapters`. The returned task's params are `adapter_params(adapted)` (replicated: they
    are small); its loss and eval see `set_adapters(adapted, params)`. The frozen base is replicated on every device
    too (no `frozen_logical_axes`): right for the CPU-scale studies, not for a base too big for one device.
    `optimizer` (default: config.train's AdamW) and `lr_schedule` (what is logged as "lr") are the loop's
    `Task.optimizer` / `Task.lr_schedule`, e.g. `lora_plus(schedule, 16.0)` for LoRA+.
    """
    if task.frozen is not None:
        raise ValueError("adapter_task: `task` already has frozen inputs; expected a task over plain LM params")
    if task.param_labels is not None or task.label_settings:
        raise ValueError(
            "adapter_task: `task` labels its params (param_labels/label_settings); the adapters replace them, so "
            "pass a task without labels"
        )
    adapters = adapter_params(adapted)
    loss_fn, eval_fn = task.loss_fn, task.eval_fn

    def adapter_loss(params, batch, frozen):
        return loss_fn(set_adapters(frozen, params), batch)

    def adapter_eval(state):
        return eval_fn(state.replace(params=set_adapters(adapted, state.params)))

    return dataclasses.replace(
        task,
        init_params=lambda rng: adapters,
        logical_axes=jax.tree.map(lambda _: P(), adapters),
        loss_fn=adapter_loss,
        eval_fn=None if eval_fn is None else adapter_eval,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        frozen=adapted,
        frozen_logical_axes=None,
    )

"""A transformers ``TrainerCallback`` that logs how far the adapters' rotations are from orthogonal.

Imported on its own (``from orthoft.trainer_callback import OrthogonalityCallback``, or
``orthoft.OrthogonalityCallback``), so that orthoft itself does not import transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from .orthogonality import orthogonality_report

__all__ = ["OrthogonalityCallback"]


class OrthogonalityCallback(TrainerCallback):
    """At each logging step, adds to the logs the worst layer's ``||R^T R - I||_2``
    (``orthogonality_error``) and its ``||Q||_2`` (``orthogonality_q_norm``); ``log_history`` keeps them.

    The Trainer calls callbacks in order and puts its reporting integrations (TensorBoard, W&B, ...)
    before those passed as ``callbacks=``; ``OrthogonalityCallback.attach(trainer)`` puts this one first,
    so that every reporter logs the values too.
    """

    def __init__(self) -> None:
        self.worst_layer: str | None = None

    @classmethod
    def attach(cls, trainer: Trainer) -> OrthogonalityCallback:
        """A new callback, called before every other callback of ``trainer``; returns it."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if logs is None or model is None or ("loss" not in logs and "train_loss" not in logs):
            return
        worst = orthogonality_report(model).worst
        if worst is None:
            return
        self.worst_layer = f"{worst.layer} ({worst.adapter})"
        values = {"orthogonality_error": worst.error, "orthogonality_q_norm": worst.q_norm}
        logs.update(values)
        # The Trainer recorded this step's logs before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

"""An exponential moving average of a model's weights, for evaluation (`widenet train --ema-decay D`).

After every optimizer step each averaged parameter moves towards the trained one:
ema <- ema + (1 - d) * (weight - ema), with d = min(decay, (1 + t) / (10 + t)) after
t earlier updates, so that in a short run the average is not held at the random
initialisation (TensorFlow's ExponentialMovingAverage with num_updates). The average
never feeds back into training: a run with and without it trains the same weights.

BatchNorm's running statistics describe the trained weights, not their average:
an average of convolution kernels that rotate under weight decay has a smaller
norm, so its outputs are smaller than the copied statistics expect (a first run
lost ~1 point this way). `recalibrate_batch_norm` recomputes them for the averaged
weights from a few training batches before each evaluation and each checkpoint, as
SWA does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint_layout import CheckpointError

if TYPE_CHECKING:
    from .exported import Source


class ModelEMA:
    """A frozen copy of `model` (eval mode) whose weights follow the model's by an EMA."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.calibrated_at: int | None = None  # `updates` when BatchNorm was last recalibrated
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights (the same architecture as at construction)."""
        averaged, trained = list(self.module.parameters()), list(model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in trained], 1.0 - self.current_decay())
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    @torch.no_grad()
    def recalibrate_batch_norm(self, inputs: Iterable[torch.Tensor]) -> bool:
        """Recompute every BatchNorm's running mean and variance for the averaged weights: the average
        over the batches `inputs` (model inputs, e.g. normalised training images) of each batch's
        statistics. The rest of the model stays in eval mode. False (nothing read) without BatchNorm."""
        self.calibrated_at = self.updates
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return False
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        try:
            for x in inputs:
                self.module(x)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
                m.eval()
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loadable with torch.load(weights_only=True))."""
        weights = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return dict(decay=self.decay, updates=self.updates, weights=weights)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


def averaged_weights(source: Source) -> dict[str, torch.Tensor]:
    """The weight average a run's checkpoint keeps in its train state, or CheckpointError saying why
    there is none: a run trained without --ema-decay, or a model folder (one set of weights)."""
    if source.step is None:
        raise CheckpointError(f"{source.path}: a model folder holds one set of weights, no average; export the "
                              "average from its run with widenet export RUN --ema")
    averaged = source.train_state.get("ema")
    if not isinstance(averaged, dict) or "weights" not in averaged:
        raise CheckpointError(f"{source.path}: no averaged weights (the run was trained without --ema-decay)")
    return averaged["weights"]

"""The experts' balance over an update: the load-balancing loss added to the training loss, and
each expert's load, for models with mixtures of experts.

The loss is transformers' (sftplug.model.routing.load_balancing_loss), computed per micro-batch
over its real tokens as transformers computes it per forward. An update's value is its mean over
the micro-batches and, under torchrun, over the ranks: each micro-batch adds ``coef · aux / accum``
to what it backpropagates, and DDP and FSDP average gradients over ranks. ``loss`` in the metrics
stays the cross-entropy; ``aux_loss`` is reported beside it, with the busiest and the idlest
expert's load relative to its layer's mean (``expert_load_max``, ``expert_load_min``).
"""

from __future__ import annotations

import torch

from sftplug.errors import SftplugError
from sftplug.model.routing import expert_loads, load_balancing_loss, load_extremes, routings

# routers of families trained without a load-balancing loss -> how they balance their experts
NO_AUX_LOSS = {"sigmoid_groups": "balances its experts with e_score_correction_bias",
               "gemma4": "scales each expert's weight (per_expert_scale)"}


class Balance:
    """One run's bookkeeping of the experts' balance (None for a model without experts: :func:`balance_of`)."""

    def __init__(self, n_experts: int, n_layers: int, coef: float, accum: int, device: torch.device,
                 has_aux: bool = True):
        self.n_experts, self.coef, self.accum, self.has_aux = n_experts, coef, accum, has_aux
        self.shape, self.device = (n_layers, n_experts), device
        self.start()

    def start(self) -> None:
        """A new update's sums: [aux loss, each layer's expert loads...] on the device, read with the loss."""
        self.sums = torch.zeros(1 + self.shape[0] * self.shape[1], device=self.device)

    def after_forward(self, model, mb: dict) -> torch.Tensor | None:
        """This micro-batch's term of the training loss (None when the coefficient is 0); its values counted."""
        layers = routings(model)
        real = mb["real"].to(self.device, non_blocking=True)
        self.sums[1:] += expert_loads(layers, self.n_experts, real).flatten()
        if not self.has_aux:
            return None
        aux = load_balancing_loss(layers, self.n_experts, real)
        self.sums[0] += aux.detach() / self.accum
        return aux * (self.coef / self.accum) if self.coef else None

    def record(self, summed: list[float], world_size: int) -> dict:
        """The update's metrics from its sums, read and summed over ranks."""
        loads = torch.tensor(summed[1:]).view(self.shape)
        busiest, idlest = load_extremes(loads)
        aux = {"aux_loss": summed[0] / world_size} if self.has_aux else {}
        return {**aux, "expert_load_max": busiest, "expert_load_min": idlest}


def balance_of(model, coef: float | None, accum: int, device: torch.device) -> Balance | None:
    """The run's Balance: the coefficient given (--router-aux-loss-coef) or the model's own."""
    config = model.config
    if not config.has_experts:
        if coef:
            raise SftplugError(f"--router-aux-loss-coef {coef}: this model has no mixture of experts")
        return None
    experts = config.experts
    if coef is None:
        coef = experts.aux_loss_coef
    if coef and experts.router in NO_AUX_LOSS:
        raise SftplugError(f"--router-aux-loss-coef {coef}: {config.architecture} {NO_AUX_LOSS[experts.router]}, "
                           "and transformers defines no load-balancing loss for it; use 0")
    n_layers = sum(config.layer_type(i).feed_forward == "experts" for i in range(config.n_layers))
    return Balance(experts.count, n_layers, coef, accum, device, has_aux=experts.router not in NO_AUX_LOSS)

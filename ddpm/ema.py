"""Exponential moving average of a model's weights: the weights DDPM samples with.

    shadow <- decay_t * shadow + (1 - decay_t) * live,   decay_t = min(decay, (1 + n) / (w + n))

n counts the averaging updates made so far, so early on (n small) the average forgets the random
initialisation quickly. Until decay_t reaches `decay`, the shadow is an average of all the live weights
so far weighted by step^(w - 2), whose mean lies (w - 1)/w of the way through the run: w (`warmup`,
10 by default, the classic value) sets how far back it looks, and a smaller w looks further back.
Parameters and floating-point buffers are averaged, other buffers copied. The shadow stays in fp32
whatever the live model's dtype, and is updated with foreach ops (one kernel launch per group of
tensors, not one per tensor): this runs after every optimizer step. On MPS, where torch has no foreach
kernels, the float shadow is one flat buffer updated by a single lerp instead (_flat_shadow).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _warmup_value(warmup) -> float:
    """The w of the warm-up as a float: 0 for none. True / False (what checkpoints before the knob hold)
    mean the classic 10 and none."""
    if isinstance(warmup, bool):
        return 10.0 if warmup else 0.0
    if not (warmup == 0 or warmup > 1):
        raise ValueError(f"warmup={warmup} must be 0 (none) or > 1 (decay_t = (1 + n) / (warmup + n))")
    return float(warmup)


def _use_flat(shadow: OrderedDict, floats: list[str]) -> bool:
    # torch has no MPS kernel for any _foreach op (native_functions.yaml in torch 2.14 lists CUDA and XPU
    # kernels only): on MPS _foreach_lerp_ falls back to one lerp per tensor, ~300 small ops per step for
    # the UNet, and _foreach_mul_/add_ would do the same. One flat buffer takes one cat and one lerp.
    # CUDA keeps the foreach path (its kernels need no gathering copy of the live weights), and so does
    # the CPU, where a loop of ops costs nothing per launch.
    return bool(floats) and shadow[floats[0]].device.type == "mps"


def _flat_shadow(shadow: OrderedDict, floats: list[str]) -> torch.Tensor:
    """Move the float entries of `shadow` into one fp32 buffer; each entry becomes a view of it with its
    old strides (channels_last stays channels_last), so the buffer's order is each tensor's memory order."""
    first = shadow[floats[0]]
    flat = torch.empty(sum(shadow[k].numel() for k in floats), dtype=torch.float32, device=first.device)
    offset = 0
    for k in floats:
        t = shadow[k]
        view = flat.as_strided(t.shape, torch.empty_like(t, device="meta").stride(), offset)  # dense strides
        shadow[k] = view.copy_(t)
        offset += t.numel()
    return flat


def _memory_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`'s elements as a 1-D tensor in the memory order of `like`, a dense view of the flat shadow: a view
    of `t` when their strides agree (no copy), else a copy laid out as `like` (the live model changed its
    memory format since the EMA was made)."""
    if t.stride() != like.stride():
        t = torch.empty_like(like, dtype=t.dtype).copy_(t)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class EMA:
    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.9999,
        update_after_step: int = 0,
        update_every: int = 1,
        warmup: float = 10.0,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        if update_after_step < 0 or update_every < 1:
            raise ValueError(
                f"need update_after_step >= 0 and update_every >= 1, got {update_after_step} and {update_every}"
            )
        warmup = _warmup_value(warmup)
        self.model = unwrap(model)
        self.decay, self.update_after_step, self.update_every, self.warmup = (
            decay,
            update_after_step,
            update_every,
            warmup,
        )
        self.step = 0  # update() calls so far
        self.num_updates = 0  # averaging updates so far (the n of the warm-up)
        live = self._live()
        self.names = list(live)
        self.shadow = OrderedDict(
            (k, v.detach().clone().float() if v.is_floating_point() else v.detach().clone()) for k, v in live.items()
        )
        self._floats = [k for k in self.names if self.shadow[k].is_floating_point()]
        self._flat = _flat_shadow(self.shadow, self._floats) if _use_flat(self.shadow, self._floats) else None

    def _live(self) -> OrderedDict:
        # keep_vars: the parameters themselves, so copies into them reach the model
        return self.model.state_dict(keep_vars=True)

    def current_decay(self) -> float:
        """The decay the next averaging update will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (self.warmup + n))

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step."""
        self.step += 1
        live = self._live()
        if self.step <= self.update_after_step:  # too early to average: track the live weights
            if self._flat is not None:
                self._flat.copy_(self._flat_live(live))
                self._copy_others(live)
            else:
                torch._foreach_copy_(list(self.shadow.values()), [live[k].detach() for k in self.names])
            return
        if (self.step - self.update_after_step) % self.update_every:
            return
        weight = 1.0 - self.current_decay()
        if self._flat is not None:
            self._flat.lerp_(self._flat_live(live), weight)
        else:
            src = [live[k].detach() for k in self._floats]
            if any(s.dtype != torch.float32 for s in src):
                src = [s.float() for s in src]
            torch._foreach_lerp_([self.shadow[k] for k in self._floats], src, weight)
        self._copy_others(live)
        self.num_updates += 1

    def _copy_others(self, live: OrderedDict) -> None:
        others = [k for k in self.names if not self.shadow[k].is_floating_point()]
        if others:
            torch._foreach_copy_([self.shadow[k] for k in others], [live[k].detach() for k in others])

    def _flat_live(self, live: OrderedDict) -> torch.Tensor:
        """The live float weights in the flat shadow's order, as one fp32 tensor: one cat (a view per tensor)."""
        flat = torch.cat([_memory_order(live[k].detach(), self.shadow[k]) for k in self._floats])
        return flat.float()

    def shadow_state_dict(self) -> OrderedDict:
        """The averaged weights as a state_dict for model.load_state_dict (references, not copies)."""
        return OrderedDict(self.shadow)

    @contextlib.contextmanager
    def swapped_in(self):
        """Put the EMA weights into the live model for the body (e.g. sampling), then restore the
        live weights, also when the body raises. Yields the model."""
        live = self._live()
        tensors = [live[k].detach() for k in self.names]
        backup = [t.clone() for t in tensors]
        with torch.no_grad():
            for t, s in zip(tensors, self.shadow.values()):
                t.copy_(s)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(tensors, backup)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "update_after_step": self.update_after_step,
            "update_every": self.update_every,
            "warmup": self.warmup,
            "step": self.step,
            "num_updates": self.num_updates,
            "shadow": OrderedDict((k, v.clone()) for k, v in self.shadow.items()),
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing, unexpected = set(self.names) - set(shadow), set(shadow) - set(self.names)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match this model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}; was it saved for another UNetConfig?"
            )
        for k in self.names:
            if shadow[k].shape != self.shadow[k].shape:
                raise ValueError(
                    f"EMA state {k!r} has shape {tuple(shadow[k].shape)}, this model {tuple(self.shadow[k].shape)}"
                )
            self.shadow[k].copy_(shadow[k])
        self.decay, self.update_after_step = float(state["decay"]), int(state["update_after_step"])
        self.update_every, self.warmup = int(state["update_every"]), _warmup_value(state["warmup"])
        self.step, self.num_updates = int(state["step"]), int(state["num_updates"])

"""The deterministic PPO actor as a plain torch module, loadable from safetensors (no pickle).

SB3's ``MlpPolicy`` (``ActorCriticPolicy``) computes the Gaussian mean action as
``action_net(mlp_extractor.policy_net(obs))``; the deterministic action is that mean, clipped
to the action box. We export exactly those layers so serving needs neither SB3 nor pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from regime.hmm import ModelLoadError

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


class Actor(Protocol):
    """What a bundle's actor offers its callers: :class:`ActorNet`, or a seed ensemble's
    :class:`agents.ensemble.EnsembleActor`."""

    @property
    def obs_dim(self) -> int:
        """Length of the observation it reads (market columns + account features)."""
        ...

    @property
    def action_dim(self) -> int:
        """Length of the action it returns (5)."""
        ...

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The deterministic action, float32 (action_dim,), in [-1, 1], of one observation (obs_dim,)."""
        ...


class ActorNet(nn.Module):
    """MLP ``obs (B, obs_dim) float32 -> mean action (B, action_dim)``, SB3 layer layout."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.policy_net = nn.Sequential(*layers)
        self.action_net = nn.Linear(width, action_dim)
        self.obs_dim, self.action_dim, self.hidden, self.activation = obs_dim, action_dim, hidden, activation

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action (the Gaussian mean, unclipped) of a batch ``obs``."""
        return self.action_net(self.policy_net(obs))

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Return the deterministic action, float32 (action_dim,), clipped to [-1, 1]."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(1, -1)
        return np.clip(self.forward(x)[0].numpy(), -1.0, 1.0).astype(np.float32)


def actor_state_from_sb3(sb3_policy: nn.Module) -> dict[str, torch.Tensor]:
    """Extract the actor's tensors from an SB3 ``ActorCriticPolicy`` under ActorNet's names."""
    state = sb3_policy.state_dict()
    out = {}
    for key, value in state.items():
        for prefix, new in (("mlp_extractor.policy_net.", "policy_net."), ("action_net.", "action_net.")):
            if key.startswith(prefix):
                out[new + key[len(prefix):]] = value.detach().cpu().clone().contiguous()
    if not any(k.startswith("action_net.") for k in out):
        raise ValueError("SB3 policy has no action_net: not an ActorCriticPolicy with a Box action space")
    return out


def save_actor(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write actor tensors to ``path`` (safetensors) from whatever device they are on (CPU, CUDA): each is
    detached, copied to the CPU and made contiguous first. A safetensors file records dtype, shape and byte
    offsets only, never a device, so a bundle trained on a GPU is the same file as one trained on the CPU."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_actor(path: Path, *, obs_dim: int, action_dim: int, hidden: tuple[int, ...], activation: str) -> ActorNet:
    """Build an :class:`ActorNet` on the CPU and load its weights from safetensors (no pickle; the tensors are
    created on the CPU, as ``torch.load(..., map_location="cpu")`` would place them).

    Raises
    ------
    ModelLoadError
        If the file is missing, truncated/corrupt, or its tensors do not fit the architecture.
    """
    try:
        tensors = load_file(str(path), device="cpu")  # every tensor on the CPU, whatever trained it
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"cannot read actor weights {path}: {type(exc).__name__}: {exc}") from exc
    net = ActorNet(obs_dim, action_dim, hidden, activation)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"actor weights {path} do not match the architecture: {exc}") from exc
    net.eval()
    return net

"""Network building blocks shared by the algorithms.

- ``mlp``: a plain MLP head (ReLU between layers, none after the last).
- ``ItemEmbedding``: an ``nn.Embedding`` that maps the padding id -1 to a zero vector.
- ``HistoryEncoder``: pools a padded history of item ids into one vector, by masked mean or
  by a GRU read up to the last real item (the YouTube paper's recurrent state, simplified).
- ``StateEncoder``: ``[user_obs ; history encoding]`` through an MLP: the state s used by
  REINFORCE, SlateQ and the MF user tower.
- ``Critic``: Q(s, a) for a state vector and an action vector (DDPG-style critics).
- ``ItemTower``: an item's vector from its learned embedding and/or its observable features.

All modules are deterministic given torch's seed at construction; nothing here owns an
optimiser or an RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation=nn.ReLU) -> nn.Sequential:
    """``in_dim -> hidden... -> out_dim`` with ``activation`` between layers only."""
    dims = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ItemEmbedding(nn.Module):
    """Embeddings for item ids ``0..n_items-1``; id -1 (padding) maps to zeros.

    Stored with one extra row 0 for padding (``padding_idx``), so ids are shifted by one.
    ``weight_ID`` exposes the real items' vectors (for faiss and ``item_embeddings``).
    """

    def __init__(self, n_items: int, dim: int, init_std: float = 0.1) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, dim
        self.table = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=init_std)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Out-of-range ids (a catalogue that grew) fall back to the padding row, not a crash.
        shifted = torch.where((ids >= 0) & (ids < self.n_items), ids + 1, torch.zeros_like(ids))
        return self.table(shifted)

    @property
    def weight_ID(self) -> torch.Tensor:
        return self.table.weight[1:]


class HistoryEncoder(nn.Module):
    """Encodes ``history_BH`` (left-aligned, -1 padded) into ``(B, out_dim)``.

    ``mode="mean"``: masked mean of item embeddings (zeros for an empty history).
    ``mode="gru"``: a GRU over the real items, taking the hidden state after the last one.
    """

    def __init__(self, items: ItemEmbedding, mode: str = "mean") -> None:
        super().__init__()
        if mode not in ("mean", "gru"):
            raise ValueError(f"HistoryEncoder mode must be 'mean' or 'gru', got {mode!r}")
        self.items, self.mode = items, mode
        self.out_dim = items.dim
        if mode == "gru":
            self.gru = nn.GRU(items.dim, items.dim, batch_first=True)

    def forward(self, history_BH: torch.Tensor, mask_BH: torch.Tensor) -> torch.Tensor:
        emb_BHD = self.items(history_BH) * mask_BH.unsqueeze(-1)
        if self.mode == "mean":
            count_B1 = mask_BH.sum(-1, keepdim=True).clamp(min=1)
            return emb_BHD.sum(1) / count_B1
        out_BHD, _ = self.gru(emb_BHD)
        length_B = mask_BH.sum(-1)
        last_B = (length_B - 1).clamp(min=0)
        picked_BD = out_BHD[torch.arange(out_BHD.shape[0]), last_B]
        return picked_BD * (length_B > 0).unsqueeze(-1)


class StateEncoder(nn.Module):
    """s = MLP([user_obs ; history encoding]) of size ``out_dim``."""

    def __init__(
        self,
        user_obs_dim: int,
        history: HistoryEncoder | None,
        out_dim: int,
        hidden: Sequence[int] = (64,),
    ) -> None:
        super().__init__()
        self.history = history
        in_dim = user_obs_dim + (history.out_dim if history is not None else 0)
        self.out_dim = out_dim
        # A world with neither observation nor history still needs an input: a constant 1.
        self.bias_only = in_dim == 0
        self.net = mlp(max(in_dim, 1), hidden, out_dim)

    def forward(self, user_obs_BU: torch.Tensor, history_BH: torch.Tensor,
                history_mask_BH: torch.Tensor) -> torch.Tensor:
        parts = [user_obs_BU]
        if self.history is not None:
            parts.append(self.history(history_BH, history_mask_BH))
        x_BI = torch.cat(parts, dim=-1)
        if self.bias_only:
            x_BI = torch.ones(user_obs_BU.shape[0], 1)
        return self.net(x_BI)

    def encode(self, state) -> torch.Tensor:
        """Convenience for a ``learner.batch.StateBatch``."""
        return self(state.user_obs_BU, state.history_BH, state.history_mask_BH)


class ItemTower(nn.Module):
    """An item's vector from a learned id embedding and/or its features: ``(…) -> (…, out_dim)``.

    With ``use_ids`` the id embedding is added to a linear map of the features, so id-only
    worlds (F = 0) and feature-only ones (``use_ids=False``) share one code path.
    """

    def __init__(self, n_items: int, feature_dim: int, out_dim: int, use_ids: bool = True) -> None:
        super().__init__()
        self.ids = ItemEmbedding(n_items, out_dim) if use_ids else None
        self.features = nn.Linear(feature_dim, out_dim) if feature_dim else None
        if self.ids is None and self.features is None:
            raise ValueError("ItemTower needs item ids or item features")
        self.out_dim = out_dim

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        if self.ids is not None:
            out = self.ids(ids)
        if self.features is not None:
            f = self.features(features)
            out = f if out is None else out + f
        assert out is not None  # the constructor refuses a tower with neither part
        return out


class Critic(nn.Module):
    """Q(s, a) = MLP([s ; a]) -> scalar, for a state vector and an action vector."""

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = mlp(state_dim + action_dim, hidden, 1)

    def forward(self, state_BS: torch.Tensor, action_BA: torch.Tensor) -> torch.Tensor:
        """Broadcasts ``state`` over extra action dims: (B, S) with (B, N, A) gives (B, N)."""
        if action_BA.dim() == state_BS.dim() + 1:
            state_BS = state_BS.unsqueeze(-2).expand(*action_BA.shape[:-1], state_BS.shape[-1])
        return self.net(torch.cat([state_BS, action_BA], dim=-1)).squeeze(-1)


# ------------------------------------------------------------------ snapshot helpers
# Snapshots are flat ``dict[str, np.ndarray]`` (safetensors-friendly). These helpers turn
# modules, optimisers and torch generators into such dicts under a key prefix and back,
# bit-exactly, so a restored agent continues exactly as the original would have.


def module_to_arrays(prefix: str, module: nn.Module) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().numpy().copy()
            for k, v in module.state_dict().items()}


def module_from_arrays(prefix: str, module: nn.Module, arrays: dict) -> None:
    own = {k[len(prefix) + 1:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
           if k.startswith(prefix + ".")}
    module.load_state_dict(own, strict=True)


def optimizer_to_arrays(prefix: str, opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """Per-parameter optimiser state (Adam moments and step). Hyper-parameters come from the
    config, so ``param_groups`` are not stored."""
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{prefix}.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().numpy().copy()
    return out


def optimizer_from_arrays(prefix: str, opt: torch.optim.Optimizer, arrays: dict) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[name] = torch.from_numpy(np.array(value))
    sd["state"] = state
    opt.load_state_dict(sd)


def generator_to_array(gen: torch.Generator) -> np.ndarray:
    return gen.get_state().numpy().copy()


def generator_from_array(gen: torch.Generator, arr: np.ndarray) -> None:
    gen.set_state(torch.from_numpy(np.array(arr, np.uint8)))

"""Causal Temporal Convolutional Network over triple-barrier outcomes.

Architecture after Bai, Kolter & Koltun (2018), "An empirical evaluation of generic convolutional
and recurrent networks for sequence modeling", arXiv:1803.01271: residual blocks of two dilated
causal 1-D convolutions (dilation 2^i in block i) with ReLU and dropout, and a 1×1 convolution on
the residual path when the channel count changes. Causality comes from padding on the left only
(``F.pad(x, ((k−1)·d, 0))``), so the output at time t is a function of inputs at times <= t.
Weight normalisation (used in the paper) is left out: it is optional there and keeps the saved
tensor names plain. The head reads the last time step of the window: Linear(channels, 3) ->
logits over the triple-barrier outcomes (López de Prado 2018, ch. 3).

Labels: int8, ``0`` = down (lower barrier first), ``1`` = time-out (vertical barrier),
``2`` = up (upper barrier first), ``-1`` = undefined (no label; such rows are not training samples).
Probability columns follow the same order: (down, time-out, up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from market import json_codec
from regime.hmm import ModelLoadError, _read_json
from signals.config import SignalConfig

__all__ = [
    "CLASS_NAMES",
    "TCN",
    "CausalConv1d",
    "TCNSignalModel",
    "TemporalBlock",
    "train_tcn",
]

CLASS_NAMES: tuple[str, str, str] = ("down", "time_out", "up")
N_CLASSES = 3
_FORMAT_VERSION = 1
_WEIGHTS_NAME = "tcn.safetensors"
_JSON_NAME = "tcn.json"


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class CausalConv1d(nn.Module):
    """1-D convolution padded on the left only: output[t] depends on input[t − (k−1)·d .. t]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, C_in, L) to (B, C_out, L)."""
        return self.conv(F.pad(x, (self.left_pad, 0)))


class TemporalBlock(nn.Module):
    """Residual block: two causal dilated convolutions (ReLU, spatial dropout) plus the input (Bai et al. 2018)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.conv1 = CausalConv1d(in_channels, out_channels, kernel_size, dilation)
        self.conv2 = CausalConv1d(out_channels, out_channels, kernel_size, dilation)
        self.dropout = nn.Dropout1d(dropout)  # spatial dropout: whole channels (Bai et al. 2018, sec. 3.3)
        self.downsample = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, C_in, L) to (B, C_out, L), causally."""
        out = self.dropout(F.relu(self.conv1(x)))
        out = self.dropout(F.relu(self.conv2(out)))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class TCN(nn.Module):
    """Stack of :class:`TemporalBlock` (dilations 1, 2, 4, ...) and a 3-logit head.

    Parameters
    ----------
    n_features : int
        Input channels F.
    cfg : SignalConfig
        Uses ``channels``, ``levels``, ``kernel_size``, ``dropout``.
    """

    def __init__(self, n_features: int, cfg: SignalConfig) -> None:
        super().__init__()
        self.kernel_size = cfg.kernel_size
        self.levels = cfg.levels
        blocks = []
        in_ch = n_features
        for i in range(cfg.levels):
            blocks.append(TemporalBlock(in_ch, cfg.channels, cfg.kernel_size, 2**i, cfg.dropout))
            in_ch = cfg.channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cfg.channels, N_CLASSES)

    def receptive_field(self) -> int:
        """Number of input time steps that can influence one output: 1 + 2(k−1)(2^levels − 1)."""
        return 1 + 2 * (self.kernel_size - 1) * (2**self.levels - 1)

    def sequence_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at every time step: (B, F, L) -> (B, 3, L); column t depends on x[..., :t+1] only."""
        h = self.blocks(x)
        return self.head(h.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the last time step of each window: (B, F, L) -> (B, 3)."""
        h = self.blocks(x)
        return self.head(h[:, :, -1])


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_features(features: np.ndarray, n_features: int | None = None) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (T, F), got shape {features.shape}")
    if n_features is not None and features.shape[1] != n_features:
        raise ValueError(f"features must have {n_features} columns (as trained), got {features.shape[1]}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features must be a float array, got dtype {features.dtype}")
    return features


def _first_non_finite_row(features: np.ndarray, rows: np.ndarray | None = None) -> int | None:
    ok = np.isfinite(features).all(axis=1)
    if rows is not None:
        ok = ok | ~rows
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def _fork_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# ---------------------------------------------------------------------------------------------
# Model wrapper
# ---------------------------------------------------------------------------------------------


class TCNSignalModel:
    """A trained TCN with its feature standardisation; maps feature rows to outcome probabilities.

    Parameters
    ----------
    net : TCN
        Trained network (set to eval mode here).
    cfg : SignalConfig
    feature_mean, feature_std : np.ndarray, shape (F,), float32
        Standardisation fitted on the training rows: ``z = (x − mean) / std``.
    """

    def __init__(
        self, net: TCN, cfg: SignalConfig, feature_mean: np.ndarray, feature_std: np.ndarray
    ) -> None:
        self.net = net.eval()
        self.cfg = cfg
        self.feature_mean = np.asarray(feature_mean, dtype=np.float32)
        self.feature_std = np.asarray(feature_std, dtype=np.float32)
        self.device = next(net.parameters()).device

    @property
    def config(self) -> SignalConfig:
        """The configuration (alias of ``cfg``)."""
        return self.cfg

    @property
    def n_features(self) -> int:
        """Number of input feature columns F."""
        return int(self.feature_mean.shape[0])

    @property
    def window_bars(self) -> int:
        """Rows of history each prediction reads (``cfg.window_bars``)."""
        return self.cfg.window_bars

    def receptive_field(self) -> int:
        """Receptive field of the network in bars (<= ``window_bars``)."""
        return self.net.receptive_field()

    def to(self, device: str | torch.device) -> TCNSignalModel:
        """Move the network to ``device`` (e.g. "cpu", "cuda") and return ``self``."""
        self.net.to(device)
        self.device = torch.device(device)
        return self

    def predict_proba(self, features: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
        """Softmax probabilities over (down, time-out, up) for every row.

        Row t is computed from the window of rows ``t − window_bars + 1 .. t`` only (eval mode, no
        dropout, ``torch.inference_mode``), so it is the same whether the later rows exist or not.

        Parameters
        ----------
        features : np.ndarray, shape (T, F), float32 (float64 is cast)
            Causal feature rows, oldest first, all finite.
        batch_size : int, default 1024
            Windows per forward pass (memory only; batches are aligned on the absolute window index).

        Returns
        -------
        np.ndarray, shape (T, 3), float32
            Rows sum to 1. Rows t < window_bars − 1 are NaN: not enough history for a full window
            (they are never filled with zeros or a shorter window).

        Raises
        ------
        ValueError
            On a wrong shape or number of columns, a non-float dtype, or a non-finite feature row
            (the first is named): a window containing it would yield a number we must not trade on.
        """
        features = _as_features(features, self.n_features)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bad = _first_non_finite_row(features)
        if bad is not None:
            raise ValueError(f"features row {bad} has non-finite values; cannot predict on it")
        T, W = features.shape[0], self.window_bars
        out = np.full((T, N_CLASSES), np.nan, dtype=np.float32)
        if T < W:
            return out
        z = ((features.astype(np.float32) - self.feature_mean) / self.feature_std).astype(np.float32)
        self.net.eval()
        with torch.inference_mode():
            zt = torch.from_numpy(np.ascontiguousarray(z)).to(self.device)
            windows = zt.unfold(0, W, 1)  # (T − W + 1, F, W): window j ends at row j + W − 1
            n_windows = windows.shape[0]
            for start in range(0, n_windows, batch_size):
                stop = min(start + batch_size, n_windows)
                logits = self.net(windows[start:stop].contiguous())
                probs = torch.softmax(logits.float(), dim=1)
                out[start + W - 1 : stop + W - 1] = probs.cpu().numpy()
        return out

    # -- persistence -----------------------------------------------------------------------------

    def save(self, dir: Path) -> None:
        """Write ``tcn.safetensors`` (weights) and ``tcn.json`` (config, F, standardisation)."""
        from safetensors.torch import save_file

        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.net.state_dict().items()}
        save_file(tensors, str(dir / _WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {
            "format_version": _FORMAT_VERSION,
            "kind": "TCNSignalModel",
            "class_names": list(CLASS_NAMES),
            "n_features": self.n_features,
            "feature_mean": [float(v) for v in self.feature_mean],
            "feature_std": [float(v) for v in self.feature_std],
            "config": self.cfg.model_dump(mode="json"),
        }
        (dir / _JSON_NAME).write_text(json_codec.dumps(meta, strict=False, indent=2, sort_keys=True))

    @classmethod
    def load(cls, dir: Path, device: str = "cpu") -> TCNSignalModel:
        """Load a model written by :meth:`save` (safetensors; no pickle) onto ``device``.

        Raises
        ------
        ModelLoadError
            If ``tcn.json`` or ``tcn.safetensors`` is missing, corrupt or truncated, or the tensors
            do not match the described network (names, shapes, finiteness); the message names the file.
        """
        from safetensors.torch import load_file

        dir = Path(dir)
        meta_path, weights_path = dir / _JSON_NAME, dir / _WEIGHTS_NAME
        meta: dict[str, Any] = _read_json(meta_path)
        try:
            if meta.get("format_version") != _FORMAT_VERSION or meta.get("kind") != "TCNSignalModel":
                raise ValueError(
                    f"unsupported format_version/kind {meta.get('format_version')}/{meta.get('kind')}"
                )
            cfg = SignalConfig.model_validate(meta["config"])
            n_features = int(meta["n_features"])
            mean = np.asarray(meta["feature_mean"], dtype=np.float32)
            std = np.asarray(meta["feature_std"], dtype=np.float32)
            if mean.shape != (n_features,) or std.shape != (n_features,):
                raise ValueError(f"feature_mean/feature_std must have length n_features={n_features}")
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
                raise ValueError("feature_mean/feature_std must be finite, std > 0")
        except Exception as exc:
            raise ModelLoadError(f"{meta_path}: invalid model description: {exc}") from exc
        if not weights_path.is_file():
            raise ModelLoadError(f"{weights_path}: file is missing")
        try:
            tensors = load_file(str(weights_path), device="cpu")
        except Exception as exc:  # SafetensorError on truncated/corrupt files
            raise ModelLoadError(f"{weights_path}: cannot read weights: {exc}") from exc
        net = TCN(n_features, cfg)
        try:
            net.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{weights_path}: weights do not match the network: {exc}") from exc
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise ModelLoadError(f"{weights_path}: tensor {name!r} has non-finite values")
        return cls(net.to(device), cfg, mean, std)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_tcn(
    features: np.ndarray,
    labels: np.ndarray,
    cfg: SignalConfig,
    *,
    device: str = "cpu",
    valid_mask: np.ndarray | None = None,
) -> TCNSignalModel:
    """Train a TCN on windows of features ending at labelled bars.

    A sample is the window of rows ``t − window_bars + 1 .. t`` with target ``labels[t]``, for every t
    with ``labels[t] >= 0``, ``t >= window_bars − 1`` and ``valid_mask[t]`` (if given); with
    ``max_train_samples`` a seeded subset is drawn. Features are standardised per column with the mean
    and standard deviation of the rows inside training windows (a constant column gets std 1). Loss:
    cross-entropy, weighted by inverse class frequency ``n / (3 n_c)`` if ``class_weighting``;
    optimiser AdamW. Seeds: ``torch.manual_seed(cfg.seed)`` inside ``torch.random.fork_rng`` (the
    caller's global RNG state is restored afterwards) and ``np.random.default_rng(cfg.seed)`` for
    subsampling and shuffling, so the same inputs and seed give identical weights on CPU (on CUDA,
    bitwise identity additionally needs the caller to enable deterministic algorithms). Torch thread
    settings are left as the caller set them.

    Parameters
    ----------
    features : np.ndarray, shape (T, F), float32 (float64 is cast)
        Causal feature rows of the training period; rows inside training windows must be finite.
    labels : np.ndarray, shape (T,), int8
        Triple-barrier outcome at each row: 0 down, 1 time-out, 2 up, -1 undefined.
    cfg : SignalConfig
    device : str, default "cpu"
    valid_mask : np.ndarray of shape (T,) bool, optional
        Extra selection of sample end rows (e.g. False inside a purge gap).

    Returns
    -------
    TCNSignalModel
        In eval mode, on ``device``.

    Raises
    ------
    ValueError
        On shape mismatches, labels outside {-1, 0, 1, 2}, no training sample, or a non-finite feature
        row inside a training window (the first is named).
    """
    features = _as_features(features)
    labels = np.asarray(labels)
    T, n_feat = features.shape
    if labels.shape != (T,):
        raise ValueError(f"labels must have shape (T={T},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (int8), got dtype {labels.dtype}")
    bad_labels = np.flatnonzero((labels < -1) | (labels > 2))
    if bad_labels.size:
        raise ValueError(
            f"labels must be in {{-1, 0, 1, 2}}; row {int(bad_labels[0])} has {int(labels[bad_labels[0]])}"
        )
    W = cfg.window_bars
    select = labels >= 0
    select[: W - 1] = False
    if valid_mask is not None:
        valid_mask = np.asarray(valid_mask)
        if valid_mask.shape != (T,) or valid_mask.dtype != np.bool_:
            raise ValueError(
                f"valid_mask must be a bool array of shape (T={T},), got {valid_mask.dtype} {valid_mask.shape}"
            )
        select &= valid_mask
    ends = np.flatnonzero(select)
    if ends.size == 0:
        raise ValueError(f"no training sample: no labelled row t >= window_bars - 1 = {W - 1} is selected")
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train_samples is not None and ends.size > cfg.max_train_samples:
        ends = np.sort(rng.choice(ends, size=cfg.max_train_samples, replace=False))

    # Rows covered by at least one training window.
    marks = np.zeros(T + 1, dtype=np.int64)
    np.add.at(marks, ends - (W - 1), 1)
    np.add.at(marks, ends + 1, -1)
    covered = np.cumsum(marks[:T]) > 0
    bad = _first_non_finite_row(features, covered)
    if bad is not None:
        raise ValueError(f"features row {bad} has non-finite values and lies inside a training window")
    rows = features[covered].astype(np.float64)
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    z = np.where(covered[:, None], (features.astype(np.float32) - mean32) / std32, 0.0).astype(np.float32)

    y_np = labels[ends].astype(np.int64)
    counts = np.bincount(y_np, minlength=N_CLASSES).astype(np.float64)
    if cfg.class_weighting:
        weights = np.where(counts > 0, y_np.size / (N_CLASSES * np.maximum(counts, 1.0)), 0.0)
    else:
        weights = np.ones(N_CLASSES)

    dev = torch.device(device)
    with torch.random.fork_rng(devices=_fork_devices(dev)):
        torch.manual_seed(cfg.seed)
        net = TCN(n_feat, cfg).to(dev)
        windows = torch.from_numpy(z).to(dev).unfold(0, W, 1)  # (T − W + 1, F, W)
        starts = torch.from_numpy(ends - (W - 1)).to(dev)
        y = torch.from_numpy(y_np).to(dev)
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=dev))
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        net.train()
        n = ends.size
        for _ in range(cfg.epochs):
            perm = torch.from_numpy(rng.permutation(n)).to(dev)
            for b in range(0, n, cfg.batch_size):
                batch = perm[b : b + cfg.batch_size]
                xb = windows[starts[batch]]
                loss = loss_fn(net(xb), y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
    return TCNSignalModel(net, cfg, mean32, std32)

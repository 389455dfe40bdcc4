"""Typed, frozen configuration of the TCN signal model."""

from __future__ import annotations

from pydantic import Field, model_validator

from market.config_base import StrictConfig


class SignalConfig(StrictConfig):
    """Configuration of :func:`signals.tcn.train_tcn` and :class:`signals.tcn.TCNSignalModel`.

    The receptive field of the network, ``1 + 2 (kernel_size − 1)(2^levels − 1)`` bars (two causal
    convolutions per residual block, dilations 1, 2, ..., 2^(levels−1)), must fit in ``window_bars``:
    a window shorter than the receptive field would silently feed zero padding to the oldest taps.
    """

    channels: int = Field(32, ge=1, description="Number of channels of every residual block.")
    levels: int = Field(4, ge=1, le=12, description="Number of residual blocks; block i has dilation 2^i.")
    kernel_size: int = Field(3, ge=2, description="Kernel size (taps) of every causal convolution.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout probability after each convolution.")
    window_bars: int = Field(
        64, ge=2, description="Input window in bars: the prediction at t sees rows t-window_bars+1 .. t."
    )
    epochs: int = Field(5, ge=1, description="Number of passes over the training samples.")
    batch_size: int = Field(256, ge=1, description="Training minibatch size in samples (windows).")
    learning_rate: float = Field(1e-3, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW decoupled weight decay.")
    class_weighting: bool = Field(
        True, description="Weight the cross-entropy by inverse class frequency of the training labels."
    )
    seed: int = Field(
        0, ge=0, description="Seed of weight initialisation, dropout, shuffling and subsampling."
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="If set, train on a seeded random subset of at most this many samples."
    )

    def receptive_field(self) -> int:
        """Receptive field of the network in bars."""
        return 1 + 2 * (self.kernel_size - 1) * (2**self.levels - 1)

    @model_validator(mode="after")
    def _window_covers_receptive_field(self) -> SignalConfig:
        rf = self.receptive_field()
        if self.window_bars < rf:
            raise ValueError(
                f"window_bars={self.window_bars} is shorter than the receptive field {rf} "
                f"(kernel_size={self.kernel_size}, levels={self.levels}); raise window_bars or lower levels"
            )
        return self

"""Typed, frozen configuration of the regime layer (Gaussian HMM + LightGBM transition model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from market.config_base import StrictConfig


class RegimeConfig(StrictConfig):
    """Configuration of :class:`regime.hmm.RegimeHMM` and :class:`regime.transition.RegimeTransitionModel`."""

    n_states: int = Field(
        3, ge=3, le=4, description="Number of hidden regimes K of the Gaussian HMM (3 or 4)."
    )
    n_iter: int = Field(
        100, ge=1, description="Maximum number of Baum-Welch (EM) iterations when fitting the HMM."
    )
    covariance_type: Literal["full", "diag"] = Field(
        "full", description="Shape of each state's emission covariance: full (d x d) or diagonal."
    )
    seed: int = Field(0, ge=0, description="Seed of the HMM initialisation (k-means) and of LightGBM.")
    n_restarts: int = Field(
        3,
        ge=1,
        description=(
            "Number of HMM fits with seeds seed, seed+1, ...; the fit with the highest training "
            "log-likelihood is kept (guards against poor EM local optima)."
        ),
    )
    vol_col: int = Field(
        0,
        ge=0,
        description=(
            "Column of the HMM input used to order the states (state 0 = calmest, K-1 = most volatile); "
            "see state_order_by."
        ),
    )
    state_order_by: Literal["variance", "mean"] = Field(
        "variance",
        description=(
            "How states are ordered after fitting: 'variance' = ascending emission variance of column "
            "vol_col (vol_col is a return column, default); 'mean' = ascending emission mean of column "
            "vol_col (vol_col is a volatility level, e.g. log rolling volatility)."
        ),
    )
    horizon_bars: int = Field(
        24, ge=1, description="Horizon h in bars of the transition model: it predicts the regime at t + h."
    )
    lgbm_num_leaves: int = Field(15, ge=2, description="LightGBM: maximum number of leaves per tree.")
    lgbm_n_estimators: int = Field(200, ge=1, description="LightGBM: number of boosting rounds.")
    lgbm_learning_rate: float = Field(0.05, gt=0.0, le=1.0, description="LightGBM: shrinkage per round.")
    lgbm_min_child_samples: int = Field(
        50, ge=1, description="LightGBM: minimum number of training rows in a leaf (min_data_in_leaf)."
    )
    n_threads: int = Field(2, ge=1, description="Number of CPU threads LightGBM may use (fit and predict).")

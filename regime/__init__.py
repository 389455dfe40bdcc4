"""Market regimes: a Gaussian HMM with forward-filtered probabilities, and a LightGBM forecast of the regime
h bars ahead."""

"""PPO agents (Stable-Baselines3, Ray RLlib), the frozen policy and its bundle, and the baseline policies."""

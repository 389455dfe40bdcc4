"""V1, the rule-based fallback policy: indicators, rules and its config."""

"""Market data and the rules shared by training and serving: candles, validation, funding, features, labels,
instruments, decisions, the JSON codec."""

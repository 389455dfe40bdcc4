"""Serving the frozen policy bar by bar: paper, Binance testnet and live, with V1 fallback, risk guard, state
store, reconciliation and hot swap."""

"""Foundations every layer may use: typed, validated, versioned config dataclasses and dtype names."""

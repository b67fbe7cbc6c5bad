"""Summarizers: previous summary + turns to fold -> a new rolling summary."""

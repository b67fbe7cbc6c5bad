"""Test doubles shipped with the package, for the tests and the benchmark (never in production)."""

"""Real-engine test tier (a package, so that its conftest never shadows tests/conftest.py)."""

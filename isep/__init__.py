"""isep: split container image archives into base, lib and app parts, and join them back."""
__version__ = "0.1.0"

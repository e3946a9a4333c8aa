"""Layers, one idea per file. Every sub-layer follows the same small protocol (see base.py)."""

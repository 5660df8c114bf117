"""Backbones shared by several methods."""

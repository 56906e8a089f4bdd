"""Modality adapters: load a signal, make coordinates and targets, export the result."""

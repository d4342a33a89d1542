"""Renderers: each turns the frozen report into text and never prints."""

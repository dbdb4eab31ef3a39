"""Gradio demos."""

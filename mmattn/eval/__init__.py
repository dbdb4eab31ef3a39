"""Evaluators (CHAIR, POPE, video, customization) and the evaluation harness."""

"""Inference: local llama.cpp engine, remote OpenAI-compatible endpoints, routing.

This package never imports Matrix code.
"""

"""Checkpoint evaluation: discovery, ComfyUI model links and the ComfyUI sweep client."""

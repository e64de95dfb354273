"""sd3exp: declarative SD3 fine-tuning experiments for SimpleTuner and ComfyUI."""

__version__ = "0.1.0"

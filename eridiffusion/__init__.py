"""eridiffusion: LoRA training for SDXL and SD1.5 on plain PyTorch."""

__version__ = "0.1.0"

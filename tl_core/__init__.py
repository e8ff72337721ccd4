"""tl_core: the fine-tuning core. Plain PyTorch; knows nothing about Ray or where it runs."""

"""The model: this project's LLaVA definition and hyperparameters, the tiny random and synthetic
checkpoint builders, HF checkpoint files and their conversion, ExecuTorch's source transforms."""

"""The model-agnostic engine: training loop, optimisation, checkpoints, evaluation, inference, FLOPs."""

"""Tensor operations that models and the engine share, below both (``tests/test_layout.py``):
score maps formed by rows and the token counts they carry (:mod:`.scores`), BatchNorm folding
(:mod:`.batchnorm`). Nothing here knows a model, a recipe or a dataset."""

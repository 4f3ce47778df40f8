"""Trainer integrations: PyTorch Lightning (:mod:`saf_kernels.integrations.lightning`) and the
Hugging Face Transformers ``Trainer`` (:mod:`saf_kernels.integrations.hf`).

Nothing is imported here: ``import saf_kernels`` (and this package) never imports Lightning or
Transformers; import the submodule of the trainer you use. They need ``pip install lightning``
(``saf_kernels[lightning]``) and ``pip install transformers accelerate`` (``saf_kernels[hf]``).
"""

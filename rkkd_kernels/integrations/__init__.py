"""Adapters of the Kendall loss to training frameworks, one module each.

Nothing is imported here: each adapter imports its framework, which ``import rkkd_kernels`` must
never need. ``rkkd_kernels.integrations.torchdistill`` registers the loss with torchdistill
(``pip install 'rkkd-kernels[torchdistill]'``; see docs/torchdistill.md).
"""

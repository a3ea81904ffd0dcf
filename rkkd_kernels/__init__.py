"""rkkd_kernels: the fast, exact pairwise soft-Kendall loss of Rank-Kendall Knowledge Distillation.

    from rkkd_kernels import kendall_loss
    loss = kendall_loss(student_logits, teacher_logits.detach(), k=1.0)

``available_backends()`` says which backends this installation has, and why the others are absent;
``python -m rkkd_kernels`` prints that with the versions, for a bug report.
"""

# The one home of the version: pyproject.toml reads it from here (without importing the package).
__version__ = "0.1.0"

from .backends import available_backends
from .loss import KendallLoss, kendall_loss
from .reference import kendall_reference_rows

__all__ = ["kendall_loss", "KendallLoss", "available_backends", "kendall_reference_rows"]

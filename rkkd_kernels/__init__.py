"""rkkd_kernels: the fast, exact pairwise soft-Kendall loss of Rank-Kendall Knowledge Distillation.

    from rkkd_kernels import kendall_loss
    loss = kendall_loss(student_logits, teacher_logits.detach(), k=1.0)

``available_backends()`` says which backends this installation has, and why the others are absent;
``BACKENDS`` names them all; ``python -m rkkd_kernels`` prints that with the versions, for a bug
report. Two modules are public too: ``rkkd_kernels.expsum`` (the exponential-sum method's lattice
and the cost model of ``method="auto"``) and ``rkkd_kernels.triton_tools`` (needs Triton: the Triton
kernel's compiled forms for ahead-of-time compilers, and how a call is launched).
"""

# The one home of the version: pyproject.toml reads it from here (without importing the package).
__version__ = "0.1.0"

from .backends import BACKENDS, available_backends
from .loss import KendallLoss, kendall_loss
from .reference import kendall_reference_rows

__all__ = ["kendall_loss", "KendallLoss", "available_backends", "kendall_reference_rows", "BACKENDS"]

"""Warnings the trainer silences because they say nothing about the user's job; each one exactly.

fbgemm registers no autograd kernel for ``fbgemm::dense_embedding_codegen_lookup_function`` (the
lookup of data-parallel tables); torch's C++ autograd fallback then ``TORCH_WARN``s on the first
backward through it, which reaches Python as a ``UserWarning`` from ``torch/autograd/graph.py``.
The tables do get correct gradients (verified when this was reported, issue 10), so the message
only alarms. The filter matches that one operator's message: the same warning for any other operator
(a real missing autograd kernel) still shows (tests/test_known_warnings.py).
"""

from __future__ import annotations

import re
import warnings

#: start of the message (``warnings`` filters match the message from its start)
FBGEMM_DENSE_LOOKUP_NO_AUTOGRAD = (
    "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered"
)


def quiet_benign_fbgemm_warning() -> None:
    """Install the filter (idempotent: ``warnings.filterwarnings`` drops an identical earlier one)."""
    warnings.filterwarnings("ignore", message=re.escape(FBGEMM_DENSE_LOOKUP_NO_AUTOGRAD), category=UserWarning)

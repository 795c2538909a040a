"""Compute building blocks (pure-torch references and optional Triton kernels) for KV-cache compression.

Import the functions from their modules:

- :mod:`mpckv.kernels.window_scores`: ``window_column_scores`` (observation-window key importance),
- :mod:`mpckv.kernels.page_bounds`: ``page_minmax``, ``page_upper_bound``, ``update_page_minmax``,
  ``num_valid_pages`` (Quest page metadata and bounds),
- :mod:`mpckv.kernels.decode_attention`: ``decode_attention`` (GQA decode attention over a padded cache).

The functions are deliberately not re-exported here: ``decode_attention`` would shadow its own module.

Every public function takes ``impl: Literal["auto", "torch", "triton"]``; ``"auto"`` uses Triton for
CUDA inputs when Triton is installed and the pure-torch implementation otherwise. Triton is optional:
``HAS_TRITON`` tells whether it imported. To run the Triton kernels on CPU tensors (tests), set
``TRITON_INTERPRET=1`` before importing triton and this package.
"""

from ._common import HAS_TRITON

__all__ = ["HAS_TRITON"]

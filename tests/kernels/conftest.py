"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` (and ``mpckv.kernels``) is first imported; setting it
here as well as at the top of each test module makes that independent of collection order within this
folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

"""The Ultralytics adapter: every place yoloprune touches Ultralytics internals lives in this package.

Importing it switches Ultralytics offline first (see :mod:`yoloprune.offline`).
``tests/test_adapter_contract.py`` fails loudly when an Ultralytics upgrade moves what we rely on.
"""

from yoloprune.offline import configure_offline

configure_offline()

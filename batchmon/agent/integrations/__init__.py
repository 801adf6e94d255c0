"""Trainer callbacks that attach the batchmon agent with what the trainer already knows.

- ``batchmon.agent.integrations.lightning.BatchmonCallback`` for Lightning (``lightning.pytorch`` or
  ``pytorch_lightning``)
- ``batchmon.agent.integrations.transformers.BatchmonCallback`` for the Hugging Face ``Trainer``

Each submodule imports its library when imported itself (this package imports nothing), so that a missing
library is a one-line ImportError naming the pip command, not a failure of ``import batchmon``.
"""

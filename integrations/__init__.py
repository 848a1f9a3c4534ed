"""Integrations, installed as ``prune_plugin.integrations``; each is imported only when used.

- ``transformers``: Trainer callback, ``PruningTrainer``, distillation, metrics
- ``datasets``: loading and tokenising task data
- ``job``: the ``prune-plugin fine-prune`` job
"""

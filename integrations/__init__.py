"""Integrations, installed as ``prune_plugin.integrations``; each is imported only when used.

- ``transformers``: Trainer callback, ``PruningTrainer``, distillation, metrics
- ``deepspeed``: the engine from its JSON config, ZeRO 0-3
- ``job``: the ``prune-plugin fine-prune`` job, a subpackage: its config and run
  (``job``), task data (``job.datasets``, ``job.question_answering``) and the output folder
  (``job.run_folder``)
"""

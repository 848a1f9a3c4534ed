"""Integrations, installed as ``prune_plugin.integrations``; each is imported only when used.

- ``transformers``: Trainer callback, ``PruningTrainer``, distillation, metrics
- ``deepspeed``: the engine from its JSON config, ZeRO 0-3
- ``hub``: ``load_shrunk``, a shrunk model back with its stock class (``prune_plugin.load_shrunk``)
- ``plots``: the picture of a run (``sparsity.png``)
- ``job``: the ``prune-plugin fine-prune`` job, a subpackage: its config and run
  (``job``), task data (``job.datasets``, ``job.question_answering``) and the output folder
  (``job.run_folder``)
"""

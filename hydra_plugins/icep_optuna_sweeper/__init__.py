"""icep's Optuna sweeper for Hydra: ``python -m icep -m hydra/sweeper=icep_optuna ...``.

Unlike hydra-optuna-sweeper, each job receives its Optuna trial (``optuna.storage``,
``optuna.study_name``, ``optuna.trial``), so a pruner can stop it between pruning steps.
"""

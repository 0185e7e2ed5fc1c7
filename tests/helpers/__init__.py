"""Helpers shared by the tests and by the scripts in ``tests/scripts`` (no tests live here).

- ``dist``: run a script in its own processes (``run_script``) and the environment a child
  process needs to import these helpers and the examples (``script_env``);
- ``models``: small LightningModules and their data (plain Lightning code), with the GPT of
  ``examples/gpt.py``;
- ``cases`` and ``eval_cases``: training and evaluation cases run both pipelined and as a
  single-process reference;
- ``random_models``: the random small DAG models of the randomised equivalence test.

pytest finds this package through ``pythonpath`` in ``pyproject.toml`` (``tests`` and
``examples``): ``from helpers.cases import run_case``. Child processes get the same folders on
``PYTHONPATH`` from ``helpers.dist.script_env``.
"""

"""Adapters to the tools users already run.

- :mod:`apd_ext.integrations.lm_eval`: an lm-evaluation-harness model ``"apd"``
  (importing it registers the model; ``python -m apd_ext.integrations.lm_eval``
  is lm-eval's own CLI with the model registered).
- :mod:`apd_ext.integrations.hf`: ``apd_generate``, a transformers
  ``custom_generate`` callable, and :func:`~apd_ext.integrations.hf.custom_generate_dir`,
  the local folder form transformers loads with ``custom_generate=<dir>``.

Nothing is imported here, so that ``import apd_ext`` never pulls lm-eval in.
"""

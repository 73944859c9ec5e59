"""Helpers of the apd_arith lm-eval task (loaded by lm-eval through `!function`)."""
from __future__ import annotations

import os

# Importing the integration registers the "apd" model, so that
# `lm_eval --model apd --tasks .../apd_arith.yaml` needs no user import
# (lm-eval resolves a task file's !function entries before it builds the model).
import apd_ext.integrations.lm_eval  # noqa: F401
from apd_ext.tiny import test_file


def load_json(data_files=None, **_metadata):
    """datasets' json builder over data_files; relative names live in apd_ext/data."""
    import datasets

    base = os.fspath(test_file().parent)
    files = data_files or {"test": test_file().name}
    if isinstance(files, str):
        files = {"test": files}
    files = {k: v if os.path.isabs(v) else os.path.join(base, v) for k, v in files.items()}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data_files[{split!r}]: no such file {path}")
    return datasets.load_dataset("json", data_files=files)

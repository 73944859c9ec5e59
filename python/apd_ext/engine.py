"""Continuous-batching APD engine (see apd_ext.decoding.engine)."""
from apd_ext.decoding.engine import PARAM_FIELDS, Engine, StepOutput

__all__ = ["Engine", "StepOutput", "PARAM_FIELDS"]

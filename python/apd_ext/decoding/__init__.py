"""Decoding loops: APD (DESIGN.md §6) and its baselines on the same runtime."""
from apd_ext.decoding.apd import generate, generate_leftright
from apd_ext.decoding.baselines import DIFFUSION_ALGS, generate_ar, generate_diffusion
from apd_ext.decoding.engine import Engine, StepOutput
from apd_ext.decoding.results import APDOutput
from apd_ext.decoding.stats import GenerationStats

__all__ = ["generate", "generate_leftright", "generate_diffusion", "generate_ar", "APDOutput",
           "GenerationStats", "DIFFUSION_ALGS", "Engine", "StepOutput"]

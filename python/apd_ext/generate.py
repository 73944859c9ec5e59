"""Public generation API: APD and its baselines (implemented in apd_ext.decoding)."""
from apd_ext.config import APDConfig
from apd_ext.decoding import (
    DIFFUSION_ALGS,
    APDOutput,
    GenerationStats,
    generate,
    generate_ar,
    generate_diffusion,
    generate_leftright,
)

__all__ = ["APDConfig", "APDOutput", "GenerationStats", "generate", "generate_leftright",
           "generate_diffusion", "generate_ar", "DIFFUSION_ALGS"]

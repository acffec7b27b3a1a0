"""How many messages each stage gets by default, per modality (read by the CLI's help and the run)."""

from __future__ import annotations

# Sized so that each model-bound stage runs 10 s or more on 2 cores: the packaged EfficientNet-Lite0
# ran 33-47 images/s in process and ~43/s served (400 images took 8.6 s bare, 9.4 s through Triton),
# so 512 (16 full batches of 32); the image stages then take about 3 minutes together.
# Text: 2,400 sentences, 5 s of each model-bound stage at ~470/s (600 took 1.3 s, and its ratios moved
# by 5-10% from run to run). Time series: 200,000 windows, 5 s a stage at ~40,000/s (80,000 drained
# in 2 s with two workers, a group join's length).
DEFAULT_COUNTS = {"image": 512, "text": 2400, "timeseries": 200000}
# The null-encoder and raw kafka-python stages' messages: 3 s or more of each at the rates they ran on
# 2 cores (text's 3,000 passed the null pipeline in 0.4 s and raw kafka-python in 0.1 s).
DEFAULT_PLUMBING = {"image": 3000, "text": 30000, "timeseries": 200000}


def described(counts: dict[str, int]) -> str:
    """``image 512, text 2400, ...`` for a help text."""
    return ", ".join(f"{modality} {n}" for modality, n in counts.items())

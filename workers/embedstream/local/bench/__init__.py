"""``embedstream bench``: where the time goes, stage by stage, on the embedded stack.

Per modality it measures the bare model in-process, Triton alone, the whole pipeline at
saturation and at half that rate (latency), and the pipeline with a null encoder against raw
kafka-python, then reports the ratios against their targets (reported, never asserted).
"""

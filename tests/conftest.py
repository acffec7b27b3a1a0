"""Test tiers: tests/unit (no processes), tests/integration (a real local broker and Triton)."""

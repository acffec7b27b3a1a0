"""Export encoders into a Triton model repository."""

from embedstream.export.model_repository import export_model
from embedstream.export.triton_config import ExportTarget, local_cpu_target, render_config

__all__ = ["ExportTarget", "export_model", "local_cpu_target", "render_config"]

"""Export of the ε-model and the sampling step (installed as fastddpm.export)."""
from fastddpm.errors import require_extra

# here, not in .onnx: `fastddpm --help` and every other command build this parser without the
# optional onnx packages installed
GRAPHS = ("eps", "step", "both")  # what `fastddpm export --what` writes


def require_onnx_export(purpose: str) -> None:
    """The onnx extra (onnx, onnxscript), which the base install leaves out: one line if absent."""
    for module in ("onnx", "onnxscript"):
        require_extra(module, "onnx", purpose)

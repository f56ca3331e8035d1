"""Export of the ε-model and the sampling step (installed as fastddpm.export)."""

# here, not in .onnx: `fastddpm --help` and every other command build this parser without the
# optional onnx packages installed
GRAPHS = ("eps", "step", "both")  # what `fastddpm export --what` writes

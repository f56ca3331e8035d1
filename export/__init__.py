"""Export of the ε-model and the sampling step (installed as fastddpm.export)."""

"""The `fastddpm` commands: one module each, with `add_arguments(parser)` and `run(args)`.
Library code they share lives in the package proper; `export` lives in fastddpm.export."""

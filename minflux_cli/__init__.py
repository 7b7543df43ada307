"""The application layer: the `minflux` commands (parity, convert, generate, train, cache).

The only package that parses arguments and picks a framework. Each command is one module with
`add_arguments(parser)` and `run(args) -> int`; `minflux_cli.main` dispatches and enforces the error contract.
"""

"""The parity suite: load one checkpoint into PyTorch and JAX and measure their agreement block by block.

`parity.transformer.run` / `parity.autoencoder.run` return report rows; `minflux parity` (`minflux_cli/parity.py`)
is the command.
"""

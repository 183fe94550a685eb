"""prefcli: end-to-end alignment workflows from the command line."""

__version__ = "0.1.0"

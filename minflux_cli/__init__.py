"""The application layer: the `minflux` commands (parity, convert, generate, train, cache).

The only package that parses arguments and picks a framework. Each command is one module with
`add_arguments(parser)` and `run(args) -> int`; `minflux_cli.main` dispatches and enforces the error contract.
"""

import os as _os
import signal as _signal
import sys as _sys


def _early_stop(signum, frame):  # (nothing is written yet: no file to clean up)
    words = [a for a in _sys.argv[1:] if not a.startswith("-")][:1]
    command = f"minflux {words[0]}" if words and words[0].isalpha() else "minflux"
    word = "interrupted" if signum == _signal.SIGINT else "terminated"
    print(f"{command}: {word}", file=_sys.stderr, flush=True)
    _os._exit(130 if signum == _signal.SIGINT else 143)


# The `minflux` console script (and `python -m minflux_cli`) imports this package first: Ctrl-C and SIGTERM get
# their one line from here on, while the command's modules are still being imported; `main` then installs the
# handlers that clean up. Anyone else importing the package (tests, notebooks) keeps their own handlers.
if _os.path.basename(_sys.argv[0]) in ("minflux", "-m") and _signal.getsignal(_signal.SIGINT) in (
    _signal.default_int_handler,
    _signal.SIG_DFL,
):
    for _sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_sig, _early_stop)

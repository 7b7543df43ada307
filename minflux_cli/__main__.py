import sys

from minflux_cli.main import main

sys.exit(main())

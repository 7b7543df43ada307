from minflux_cli.main import cli

cli()

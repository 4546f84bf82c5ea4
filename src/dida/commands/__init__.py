"""One module per ``dida`` subcommand; each has ``main(args) -> int``. ``dida.cli`` only parses arguments."""

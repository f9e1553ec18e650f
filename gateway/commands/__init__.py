"""One module per `sandgate` subcommand."""

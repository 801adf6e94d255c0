"""The `batchmon` command: argparse in main.py, one handler module per subcommand, imported lazily."""

"""One module per subcommand that does more than print: `harness train` and `harness run`
(train.py), replay, verify, doctor, sweep, variance, submit, runs, compare and machine.
cli.py parses the command line and calls them; each raises HarnessError subclasses, which
the CLI turns into a message and an exit code in one place.

Commands sit above everything else and may import any layer below: backends and
containers, then training, record and script, then config, then the base modules."""

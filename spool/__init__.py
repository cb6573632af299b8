"""The `spool` command line: argument parsing and printing over the producer, worker and engine packages."""

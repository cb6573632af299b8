"""The `spool` command tree: main (parser, entry point), worker, jobs, admin and batch verbs."""

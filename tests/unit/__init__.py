"""The unit tier (make test-fast); a package, so its file names may repeat those of tests/."""

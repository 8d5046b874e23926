"""Running a user's own command as a run (`harness run`): the runner (runner.py), the
injection that puts each of its Python processes inside the harness's runtime
(injection/pinning.py, loaded by injection/bootstrap/sitecustomize.py), the files it
imports (imports.py) and the files it reads and writes (files.py: inputs hashed, outputs
collected and compared).

A middle layer beside training and record; it may import them, config and the base
modules."""

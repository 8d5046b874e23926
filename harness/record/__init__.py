"""What a run leaves behind and how it is judged: the lockfile (its fields, seal and the
facts captured into it: lockfile.py, facts.py, facts_cache.py), the replay gate (gate.py,
with the machine corpus in corpus.py and cpu_ops.py), the bitwise comparison (bitwise.py),
metrics and trackers (metrics.py, tracking.py), integrity, signatures and trust
(integrity.py, signing.py, trust.py), op traces read and compared (op_trace.py; the
training process records them: training/op_tracer.py) and run statistics (stats.py).

A middle layer beside training and script: it may import them, config and the base
modules, never commands, backends or containers. Nothing here imports torch at module
level: `harness runs` and `harness lock diff` start without it."""

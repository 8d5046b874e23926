"""What this machine is and has, asked of the machine itself: its CPU class (machine_class.py), its
NVIDIA GPUs (gpu.py) and its Docker engine (docker_engine.py).

A base package: it imports only errors and env, and everything else may import it."""

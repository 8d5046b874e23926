"""Container images built to the same id every time: the Dockerfile render and build
(image.py), the reproducible OCI layers and archives (oci.py), and the sandbox a docker
run gets (sandbox.py: mounts, user, network, limits).

May import config and the base modules (host's Docker engine client among them); never the
training process's modules."""

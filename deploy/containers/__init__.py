"""Containers for real: Podman as the Docker engine, images built without a registry, the runs that test them."""

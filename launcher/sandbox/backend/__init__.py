"""Container backends: the seam between the pool and whatever runs sandbox containers.

``base`` holds the typed Protocol and its data types; ``docker_engine`` is the Docker
implementation. It and ``launcher.sandbox.image.build`` (which builds the image) are the only
modules of duckcell that import ``docker``.
"""

from .base import ContainerInfo, ContainerState, SandboxBackend, SandboxHandle, SandboxSpec

__all__ = ["ContainerInfo", "ContainerState", "SandboxBackend", "SandboxHandle", "SandboxSpec"]

"""The ``duckcell`` command: ``main`` parses arguments and dispatches; one module per command
group (``controlplane``, ``cache``, ``secrets``), ``output`` writes results, ``allocator`` tunes
glibc malloc for the process. The only package that may import every layer.
"""

from .main import main

__all__ = ["main"]

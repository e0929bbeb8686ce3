"""Generated protocol code. Do not edit: change ``*.proto`` and run ``make proto``.

The runner inside the sandbox image imports this package and nothing else of the launcher.
"""

"""The operator commands: the ``detour`` CLI, ``warm`` and ``containerd-hosts``."""

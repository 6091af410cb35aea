"""The Hydra config tree, shipped as the package ``training.configs`` (``training/configs``
links here), so that the ``train`` and ``evaluate`` commands find it from every install and
working directory (``pkg://training.configs``). Hydra needs this file to read it as a package."""

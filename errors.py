"""The mistakes a command reports in one line each, without a traceback: a ConfigError (the command or its config) and
a LoadError (a model folder it names that cannot be loaded as it is). Below every other module (it imports nothing),
so that the config's checks (recipes.py), a run's folders (checkpoints.py) and the loaders (folders.py) raise the
same kind; recipes.ConfigError and folders.LoadError are these. A bad record is records.DataError."""


class ConfigError(ValueError):
    """A mistake in the command or config: train.py prints it as one line and exits with status 2."""


class LoadError(ConfigError):
    """A folder the command names cannot be loaded as it is (its weights are not finite, it asks to run its own code):
    one line, printed by each script as its other command errors (train.py's as a ConfigError, exit status 2)."""

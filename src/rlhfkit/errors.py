"""The one error type users see: a message that names the file, line or field at fault."""


class RlhfkitError(Exception):
    """A problem with the user's input (config, data, model path). The CLI prints it without a traceback."""


class ConfigError(RlhfkitError):
    pass


class DataError(RlhfkitError):
    pass


class ModelLoadError(RlhfkitError):
    pass


class NonFiniteError(RlhfkitError):
    """Training produced a non-finite loss, gradient norm or weight."""

"""One base class for errors caused by the user's input, so the CLI prints them as one line."""


class LlmrayError(ValueError):
    """Bad input: a recipe key, a file, a shard. The message names what is wrong."""


USER_ERRORS = (LlmrayError,)

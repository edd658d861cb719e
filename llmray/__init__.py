import logging


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


# torchao is imported by transformers whenever a model is built, in every training worker. On CPU it warns once per
# CUDA-only kernel library it cannot load, and torch warns about how torchao registers an enum: expected, not news.
logging.getLogger("torchao").addFilter(_DropMessages("Failed to load"))
logging.getLogger("torch.utils._pytree").addFilter(_DropMessages("register_constant() on Enum subclasses"))

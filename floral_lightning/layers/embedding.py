from .base import FloralLayer


class FloralEmbedding(FloralLayer): ...

"""RahatBack's shared language: subjects, message models, stream definitions. No I/O."""

from . import messages, streams, subjects

__all__ = ["messages", "streams", "subjects"]

"""The OpenAI-compatible API on the local engine (``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``): hivebridge as an inference node for other programs.

Requests join the same continuous batch as the bridge's own replies, at a
priority of their own; personas are models (``persona:<name>``). See
:mod:`.server`.
"""

from .auth import ApiToken
from .catalog import ApiModels, PersonaModel
from .server import ApiServer, ApiSettings

__all__ = ["ApiModels", "ApiServer", "ApiSettings", "ApiToken", "PersonaModel"]

"""The one base of every component's settings (``streams.config``, ``training.config``,
``serving.config``, ``services.config``, ``training.round_config``); ``services.settings``, which
gathers them from files and the environment, applies the same rule to its own keys.

Unknown keys are errors, not ignored: a misspelt setting in a YAML file or an environment variable
must stop `up` with a message naming it rather than leave a default silently in force. Assignments
are validated too, because the CLI and the settings loader fill models in field by field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

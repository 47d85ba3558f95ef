"""Where the service and its clients find the bearer token: an environment variable, else a file. Never a
command-line value: a token typed on a command line ends up in shell histories and process lists."""

from __future__ import annotations

import os
from pathlib import Path

from step3vl_train.usage import UsageError


def read_bearer_token(token_env: str, token_file: str | None, file_key: str) -> str:
    """The token in `token_env`, else in `token_file` (named `file_key` in errors), stripped; "" if neither
    holds one."""
    token = os.environ.get(token_env, "").strip()
    if not token and token_file:
        path = Path(token_file)
        if not path.is_file():
            raise UsageError(f"{file_key}={token_file} does not exist")
        token = path.read_text().strip()
    return token

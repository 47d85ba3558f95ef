"""The service's settings: the dataclasses behind `configs/service/default.yaml` and `configs/rm/*.yaml`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from rl.chat_models import ChatModelConfig
from rl.rewards.genrm import GenRMConfig
from rl.rewards.penalties import PenaltyConfig
from rl.rm_service.token import read_bearer_token
from step3vl_train.usage import UsageError, build

BACKENDS = ("scalar", "genrm")


@dataclass
class ScalarRMConfig:
    model: str | None = None  # a reward-model export (launch/train_rm.py, then launch/export_hf.py)
    tokenizer: str | None = None  # None: the export's own
    processor: Any = None  # a processor YAML (configs/processor/*.yaml) or its mapping over the export's; None: its own
    bf16: bool | None = None  # None: bf16 where CUDA is available
    max_tokens: int = 40960  # prompt + response; a longer item is status "error", not truncated


def judge_defaults() -> ChatModelConfig:
    """The GenRM's judge: greedy, replies of up to 2048 tokens (configs/rm/genrm.yaml)."""
    return ChatModelConfig(temperature=0.0, tokenizer="tiny")


@dataclass
class RMConfig:
    backend: str = "scalar"  # scalar | genrm | pkg.module:Class (a user's: Class(**options).score(items))
    scalar: ScalarRMConfig = field(default_factory=ScalarRMConfig)
    genrm: GenRMConfig = field(default_factory=GenRMConfig)
    judge: ChatModelConfig = field(default_factory=judge_defaults)  # genrm: who judges (hf, vllm or an endpoint)
    options: dict[str, Any] = field(default_factory=dict)  # a user's backend's keyword arguments

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS and ":" not in self.backend:
            raise UsageError(f"rm.backend must be one of {BACKENDS} or 'package.module:Class', not {self.backend!r}")


@dataclass
class BatchConfig:
    """Ray Serve's dynamic batching: items of concurrent requests share a forward."""

    max_size: int = 32  # items a batch
    wait_s: float = 0.01  # how long a batch waits to fill


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"  # anything but loopback must come with a token (it always does: see token_env)
    port: int = 8780  # 0: a free port (what an RL run that starts its own service uses)
    app_name: str = "rm"  # the Ray Serve application's name
    token_env: str = "STEP3VL_RM_TOKEN"  # the bearer token: this variable, else the file below
    token_file: str | None = None  # a file holding the token (never a command-line value)
    max_body_mb: float = 64.0  # a larger request body gets 413
    max_items: int = 1024  # items a request
    max_queue: int = 64  # requests in the service at once; beyond it 503 with Retry-After
    retry_after_s: int = 1
    request_timeout_s: float = 120.0  # items not scored by then come back "timeout"
    drain_timeout_s: float = 20.0  # on SIGTERM or Ctrl-C, how long requests in flight have to finish
    backend_retries: int = 2  # times an item is sent again when its replica dies
    replicas: int = 1  # backend replicas
    replica_max_items: int = 256  # items a replica holds at once, queued for its batches
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0  # 1 for a model on a GPU
    batch: BatchConfig = field(default_factory=BatchConfig)
    penalties: PenaltyConfig = field(default_factory=PenaltyConfig)
    rm: RMConfig = field(default_factory=RMConfig)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @classmethod
    def from_dict(cls, values: Any, prefix: str = "") -> ServiceConfig:
        return build(cls, values, prefix)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(config: ServiceConfig) -> str:
    """The service's bearer token, from `token_env` or `token_file`; there is no default."""
    token = read_bearer_token(config.token_env, config.token_file, "token_file")
    if not token:
        where = "on loopback" if is_loopback(config.host) else f"on {config.host}, beyond loopback"
        raise UsageError(
            f"the service needs a bearer token {where}: set {config.token_env} or token_file=PATH, e.g. "
            f"export {config.token_env}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if len(token) < 16:
        raise UsageError(f"the bearer token has {len(token)} characters: use at least 16")
    return token

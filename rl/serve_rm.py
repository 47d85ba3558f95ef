r"""The reward-model service for RLHF: python rl/serve_rm.py rm=scalar|genrm [overrides].

export STEP3VL_RM_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
python rl/serve_rm.py rm=scalar rm.scalar.model=/models/rm_hf replicas=8 replica_gpus=1 batch.max_size=64
python rl/serve_rm.py rm=genrm rm.judge.backend=openai rm.judge.endpoint.base_url=http://judge:8000/v1
python rl/serve_rm.py rm=scalar rm.scalar.model=outputs/demo/rm_hf rm.scalar.processor=configs/processor/tiny.yaml

The token comes from STEP3VL_RM_TOKEN (or token_file=PATH), never from the command line. The service
binds 127.0.0.1 unless host= says otherwise; the API is in docs/rlhf.md. Ctrl-C stops it.
"""

import time

import ray
from omegaconf import DictConfig, OmegaConf
from ray import serve

from rl.config import RayConfig
from rl.preflight import check_service_model
from rl.rm_service.config import ServiceConfig, read_token
from rl.rm_service.launch import start_service
from step3vl_train.cli import launch
from step3vl_train.usage import build


def serve_forever(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    ray_config = build(RayConfig, raw.pop("ray"), "ray.")
    config = ServiceConfig.from_dict(raw)
    token = read_token(config)
    check_service_model(config)
    # Without ray.address, a Ray instance of its own: never one that happens to run on the machine.
    ray.init(address=ray_config.address or "local", num_cpus=ray_config.num_cpus, include_dashboard=False)
    try:
        url = start_service(config, raw, token)
        print(f"reward-model service ({config.rm.backend}) at {url}: POST /v1/score, GET /v1/stats, GET /healthz")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    launch(serve_forever, "serve_rm", __doc__)

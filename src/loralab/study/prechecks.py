"""What a study's points would refuse when they start, checked before the study is created.

A model name typo or a LoRA target that fits no layer, found only when a point starts, would
leave a study (`study.db`) whose corrected spec or command no longer matches it: the user could
only rename the study or delete it. So `sweep`, `ablate` and `study` check every point's model
targets and initialisation the way `train` does, on a weightless skeleton, before anything is created.
"""

from __future__ import annotations

from ..config import ExperimentConfig


def check_points(cfgs: list[ExperimentConfig]) -> None:
    """Each model name (`precheck`: typos, an unreachable hub), each point's head against its
    model, and each LoRA point's targets against its layers; a model that ships its own code
    is left to its point."""
    from ..heads import head_for
    from ..lora import check_init, check_targets
    from ..models import load_config
    from ..models.registry import precheck
    from ..tasks import get_task

    checked, targets, configs = set(), set(), {}  # configs: model name -> its AutoConfig, read once
    for cfg in cfgs:
        name = cfg.model.name
        if name not in checked:
            precheck(name)
            checked.add(name)
        key = (name, cfg.model.head, cfg.data.task, cfg.train.method, repr(cfg.lora))
        if key in targets:
            continue
        targets.add(key)
        if cfg.train.method == "lora":
            check_init(cfg.lora)
        if cfg.model.trust_remote_code:
            continue  # remote code runs only when a worker is started with --trust-remote-code
        if name not in configs:
            configs[name] = load_config(name)
        head = head_for(cfg, get_task(cfg.data.task))
        head.check_model(configs[name], name)  # every method: the head must fit the model
        if cfg.train.method == "lora":
            check_targets(cfg.lora, configs[name], head.auto_class())


def fetch_models(cfgs: list[ExperimentConfig]) -> None:
    """Build or fetch each built-in model (and convert each .gguf file) the points use, here and
    once: workers started together would otherwise each download and convert it at the same
    moment (the build is atomic, so that only wastes time and memory)."""
    from ..models.build import resolve

    for name in sorted({cfg.model.name for cfg in cfgs}):
        resolve(name)  # a hub id comes back as it is: its points download it
